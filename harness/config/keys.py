"""The declared keys (harness/config/schema.py) held against a composed config, before torch is
imported: a key no declaration has (`+lr=...`, `method=full +method.r=16`), a number out of its
range or not finite, a choice not among the declared ones. Hydra's own refusals while it
composes (`train.max_steps=3.5`, an option that does not exist) become the same kind of error.
And the configuration reference in docs/ is written from the same declarations:

    python -m harness.config.keys --markdown > docs/configuration.md
"""

import dataclasses
import difflib
import math
import re
import sys
import typing
from typing import Any

from hydra.errors import HydraException, MissingConfigException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
)

from harness.config import schema
from harness.core.errors import ConfigError, shown
from harness.core.options import ADAPTER_KEYS, ADAPTER_METHODS

# Hydra's words for an option that is not there: "Could not find 'model/nope'".
MISSING_OPTION = re.compile(r"Could not find '([^']+)'")
# Keys Hydra adds at the top level of what it composes for a sweep or the plan.
HYDRA_KEYS = ("hydra",)


def check(cfg: DictConfig, sweep: bool = False) -> None:
    """ConfigError for the first key of `cfg` that its declaration refuses. In a sweep
    (`sweep`), a LoRA key on a method without adapters passes: a grid that crosses methods with
    ranks runs those methods once (harness/config/identity.py drops the key)."""
    for name in cfg:
        if name not in _fields(schema.Config) and name not in HYDRA_KEYS:
            raise _unknown(name, name, schema.Config, "the top level")
    _check_node(cfg, schema.Config, "", groups=False)
    for group in schema.GROUPS:
        node = cfg[group]
        kind = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(kind):
            raise ConfigError(f"{group}={_option(node)}: its file has no schema, so its keys "
                              f"cannot be checked; expected `defaults: [/schema/{group}@_here_: "
                              f"<kind>, _self_]` first (kinds: {', '.join(schema.KINDS[group])})")
        tolerated = (ADAPTER_KEYS if sweep and group == "method"
                     and node.get("name") not in ADAPTER_METHODS else ())
        for name in node:
            if name not in _fields(kind) and name not in tolerated:
                raise _unknown(f"{group}.{name}", name, kind, f"{group}={_option(node)}", group)
        _check_node(node, kind, f"{group}.")


def _check_node(node: DictConfig, kind: type, prefix: str, groups: bool = True) -> None:
    for field in dataclasses.fields(kind):
        if field.name not in node or (not groups and field.name in schema.GROUPS):
            continue
        path = f"{prefix}{field.name}"
        try:
            value = node[field.name]
        except InterpolationResolutionError as error:
            raw = OmegaConf.to_container(node)[field.name]
            raise ConfigError(f"{path}={shown(raw)} cannot be resolved ({_first_line(error)}); "
                              f"expected {expectation(field)}: fix the interpolation or give a "
                              "value") from None
        except OmegaConfBaseException as error:  # a resolved interpolation of the wrong type
            raise _refused(path, getattr(error, "value", "?"), field) from None
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(_inner(field.type)):
            _check_node(value, _inner(field.type), f"{path}.")
            continue
        if not _allowed(value, field):
            raise _refused(path, value, field)


def _allowed(value, field: dataclasses.Field) -> bool:
    meta = field.metadata
    if meta.get("check") is not None:
        return meta["check"](value) is None
    if value is None:
        return True  # typed Optional: Hydra refused None where the type does not allow it
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if meta.get("choices") is not None and value not in meta["choices"]:
        return False
    return all(bound is None or compare(value, bound) for bound, compare in (
        (meta.get("at_least"), lambda v, b: v >= b), (meta.get("above"), lambda v, b: v > b),
        (meta.get("at_most"), lambda v, b: v <= b), (meta.get("below"), lambda v, b: v < b)))


def expectation(field: dataclasses.Field) -> str:
    """What a key takes, in words: `an integer >= 1`, `one of sdpa, eager`, `true or false`."""
    meta = field.metadata
    kind, optional = _inner(field.type), _optional(field.type)
    if meta.get("expect"):
        words = meta["expect"]
    elif meta.get("choices") is not None:
        words = f"one of {', '.join(map(str, meta['choices']))}"
    elif kind is bool:
        words = "true or false"
    elif kind in (int, float):
        words = "an integer" if kind is int else "a finite number"
        bounds = [f"{sign} {meta[name]:g}" for name, sign in (
            ("at_least", ">="), ("above", ">"), ("at_most", "<="), ("below", "<"))
            if meta.get(name) is not None]
        words += f" {' and '.join(bounds)}" if bounds else ""
    elif typing.get_origin(kind) is list:
        words = "a list, e.g. [a,b]"
    elif typing.get_origin(kind) is dict or dataclasses.is_dataclass(kind):
        words = "a mapping of keys"
    else:
        words = "text"
    return words + (", or null" if optional and "null" not in words else "")


def _refused(path: str, value, field: dataclasses.Field) -> ConfigError:
    check = field.metadata.get("check")
    expected = (check(value) if check is not None else None) or expectation(field)
    default = field.default
    example = ("" if default in (MISSING, None) or isinstance(default, str) and "${" in default
               or not _allowed(default, field) else f" (its default: {path}={_yaml(default)})")
    return ConfigError(f"{path}={shown(_yaml(value))}; expected {expected} — "
                       f"{field.metadata['meaning']}: give {path} such a value{example}")


def _unknown(path: str, name: str, kind: type, where: str, group: str | None = None
             ) -> ConfigError:
    """A key that the declarations of `kind` do not have: nothing would read it."""
    known = _fields(kind)
    others = {other_name: _fields(other) for other_name, other in
              (schema.KINDS.get(group) or {}).items() if other is not kind}
    elsewhere = [other_name for other_name, fields in others.items() if name in fields]
    close = difflib.get_close_matches(name, known, n=1)
    nearby = {key for fields in others.values() for key in fields} - set(known)
    close_elsewhere = [] if close else difflib.get_close_matches(name, sorted(nearby), n=1)
    dotted = f"{group}." if group else ""
    if elsewhere:
        hint = (f"it is a key of the {group} kind {', '.join(elsewhere)}, not of this one "
                f"(docs/configuration.md); ")
    elif group is None and _in_groups(name):
        hint = f"did you mean {' or '.join(_in_groups(name))}? "
    elif close:
        hint = f"did you mean {dotted}{close[0]}? "
    elif close_elsewhere:
        kinds = [other for other, fields in others.items() if close_elsewhere[0] in fields]
        hint = (f"did you mean {dotted}{close_elsewhere[0]} (a key of the {group} kind "
                f"{', '.join(kinds)})? ")
    else:
        hint = ""
    return ConfigError(f"{shown(path)}: {where} has no key {shown(name)}, so nothing would read "
                       f"it; {hint}its keys are {', '.join(sorted(known))}: drop it or use one "
                       "of them")


def _in_groups(name: str) -> list[str]:
    """group.name for each group whose kinds declare `name` (`lr`: train.lr, method.lr)."""
    return [f"{group}.{name}" for group, kinds in schema.KINDS.items()
            if any(name in _fields(kind) for kind in kinds.values())]


def refusal(error: BaseException) -> ConfigError | None:
    """The ConfigError for what Hydra or OmegaConf refused while composing, or None where the
    error is not about the input (a bug: its traceback is wanted)."""
    if isinstance(error, ConfigError):
        return error
    cause = _omegaconf_cause(error)
    if cause is not None and cause.full_key:
        field = _field(cause.object_type, cause.key)
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            if dataclasses.is_dataclass(cause.object_type):
                group = cause.full_key.split(".")[0]
                found = _unknown(cause.full_key, str(cause.key), cause.object_type,
                                 f"this {group} option" if group in schema.GROUPS
                                 else "the top level", group if group in schema.GROUPS else None)
                if group == "method" and cause.key in ADAPTER_KEYS:
                    return ConfigError(f"{found} (a sweep across methods gives it as "
                                       f"++method.{cause.key}=...: the methods without adapters "
                                       "then run once)")
                return found
        elif field is not None:
            return _refused(cause.full_key, cause.value, field)
        return ConfigError(f"{shown(cause.full_key)}={shown(cause.value)}: "
                           f"{_first_line(cause.msg or cause)}")
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        # Hydra's own words: an option that does not exist (with the ones that do), an
        # override it cannot parse or apply.
        text = str(error).split("\nConfig search path")[0].strip()
        missing = MISSING_OPTION.search(text)
        if isinstance(error, MissingConfigException) and missing:
            group, option = missing.group(1).rsplit("/", 1)
            options = [line.strip() for line in text.split("Available options", 1)[-1]
                       .splitlines()[1:] if line.strip()]
            return ConfigError(f"{group}={shown(option)}: no such option of {group}; expected "
                               f"one of {shown(', '.join(options), 600)} (conf/{group}/): "
                               "choose one of them")
        return ConfigError(" ".join(text.split()))
    return None


def _omegaconf_cause(error: BaseException) -> OmegaConfBaseException | None:
    seen = error
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException) and getattr(seen, "full_key", None):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _field(kind, name) -> dataclasses.Field | None:
    if not dataclasses.is_dataclass(kind):
        return None
    return {field.name: field for field in dataclasses.fields(kind)}.get(name)


def _fields(kind: type) -> list[str]:
    return [field.name for field in dataclasses.fields(kind)]


def _option(node: DictConfig) -> str:
    return str(node.get("name", "?")) if isinstance(node, DictConfig) else "?"


def _inner(annotation):
    """int for Optional[int]; the annotation itself otherwise."""
    if typing.get_origin(annotation) is typing.Union:
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def _optional(annotation) -> bool:
    return typing.get_origin(annotation) is typing.Union and \
        type(None) in typing.get_args(annotation)


def _yaml(value) -> Any:
    """A value as the command line writes it: null, true, [a,b]."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return value


def _first_line(error) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# -- the reference -----------------------------------------------------------------------------

def markdown() -> str:
    """docs/configuration.md: every group's keys, the kinds that have them, from the
    declarations."""
    lines = ["# Configuration reference", "",
             "Generated from `harness/config/schema.py` by `python -m harness.config.keys "
             "--markdown`; `tests/test_schema.py` fails when the two differ.", "",
             "Each option of a group (`conf/<group>/<option>.yaml`) starts from one kind of "
             "the group's schema and sets what differs from the defaults below. A key that "
             "the option's kind does not declare is refused (`+method.r=16` with "
             "`method=full`), and so is a value of the wrong type, outside its range, or not "
             "finite; rules between keys are in `harness/config/validation.py`.", ""]
    sections = [("top level", {"": schema.Config}), ("plan_gpu", {"": schema.PlanGpu}),
                *schema.KINDS.items(), ("data.template", {"": schema.Template})]
    for group, kinds in sections:
        lines += [f"## {group}", ""]
        if len(kinds) > 1:
            lines += [f"Kinds: {', '.join(f'`{name}`' for name in kinds)}.", ""]
        lines += ["| key | takes | default | meaning |" + (" kinds |" if len(kinds) > 1 else ""),
                  "|---|---|---|---|" + ("---|" if len(kinds) > 1 else "")]
        prefix = "" if group == "top level" else f"{group}."
        declared = {}
        for kind_name, kind in kinds.items():
            for field in dataclasses.fields(kind):
                if not (kind is schema.Config and field.name in schema.GROUPS):
                    declared.setdefault(field.name, []).append((kind_name, field))
        for name, found in declared.items():
            field = found[0][1]
            default = (field.default_factory() if field.default_factory
                       is not dataclasses.MISSING else field.default)
            takes = ("the option's own (set by the choice)" if name == "name" and len(kinds) > 1
                     else expectation(field))
            row = (f"| `{prefix}{name}` | {_cell(takes)} | "
                   + ("the option's" if default is MISSING else f"`{_yaml(default)}`")
                   + f" | {_cell(field.metadata['meaning'])} |")
            if len(kinds) > 1:
                row += (" all |" if len(found) == len(kinds)
                        else f" {', '.join(kind_name for kind_name, _ in found)} |")
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text a markdown table cell shows as written."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m harness.config.keys --markdown")
    print(markdown(), end="")
