"""The schema (harness/config/schema.py): every option of every group starts from a declared
kind, every key of every option is declared, and the configuration reference in docs/ is what
the declarations say."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from harness.config import keys, schema
from harness.core.options import CONF_DIR
from tests.conftest import REPO, compose_cell


def test_the_configuration_reference_is_generated_from_the_schema():
    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == keys.markdown(), ("docs/configuration.md differs from the schema: run "
                                        "python -m harness.config.keys --markdown > "
                                        "docs/configuration.md")


OPTIONS = [(path.parent.name, path.stem) for group in schema.GROUPS
           for path in sorted((CONF_DIR / group).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_as_a_declared_kind(group, option):
    extra = ["data.path=/tmp"] if (group, option) == ("data", "local") else []
    node = compose_cell(f"{group}={option}", *extra)[group]
    kind = OmegaConf.get_type(node)
    assert kind in schema.KINDS[group].values(), f"{group}={option} is {kind}"
    declared = {field.name: field for field in dataclasses.fields(kind)}
    assert set(node) <= set(declared)  # Hydra refuses an undeclared key in an option's file
    if "name" in declared and declared["name"].metadata["choices"]:
        assert node.name in declared["name"].metadata["choices"]


def test_a_key_is_declared_once_with_a_meaning():
    for group, kinds in schema.KINDS.items():
        for kind in kinds.values():
            for field in dataclasses.fields(kind):
                assert field.metadata.get("meaning"), f"{group}.{field.name} means nothing"
                assert "check" in field.metadata, f"{group}.{field.name} is not made by key()"


def test_what_hydra_refuses_while_composing_is_said_as_a_refusal():
    from hydra.errors import ConfigCompositionException

    for override, says in (("train.max_steps=3.5", "train.max_steps=3.5; expected an integer"),
                           ("method.r=abc", "method.r=abc; expected an integer >= 1"),
                           ("model=nope", "model=nope: no such option of model")):
        with pytest.raises(Exception) as raised:
            compose_cell(override)
        assert isinstance(raised.value, (ConfigCompositionException, Exception))
        assert says in str(keys.refusal(raised.value))
    assert keys.refusal(RuntimeError("a bug")) is None  # not an input's fault: its traceback
