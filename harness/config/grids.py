"""Grids: an experiment composed as Hydra composes it, and expanded into its cells as Hydra's
basic sweeper expands it, before anything runs.
"""

import copy
import math
import multiprocessing
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from harness.config import keys
from harness.core.cores import usable_cores
from harness.core.errors import ConfigError, shown
from harness.core.files import name_problem
from harness.core.options import CONF_DIR

EXPERIMENTS = CONF_DIR.parent / "experiments"


def compose_experiment(name: str, overrides: list[str]) -> list[DictConfig]:
    """Every job of an experiment, composed as `make sweep EXP=name ARGS=...` composes them;
    overrides may sweep (method.r=4,8)."""
    _check_yaml(experiment_file(name))
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        fixed = [text for text, override in zip(overrides, parsed)
                 if not override.is_sweep_override()]
        with initialize_config_dir(config_dir=str(EXPERIMENTS), version_base="1.3"):
            sweep_config = compose(name, overrides=[*fixed, f"hydra.searchpath=[file://"
                                                             f"{CONF_DIR}]"],
                                   return_hydra_config=True)
            with open_dict(sweep_config):
                sweep_config.hydra.overrides.task = overrides
            return cells(sweep_config)
    except Exception as error:  # noqa: BLE001 - what Hydra refused, said as a refusal
        refusal = keys.refusal(error)
        if refusal is None:
            raise
        raise refusal from None


def experiment_file(name: str) -> Path:
    """experiments/<name>.yaml; ConfigError where there is none (a name with a path in it
    included: its report would be written outside reports/)."""
    path = EXPERIMENTS / f"{name}.yaml"
    if name_problem(name) is not None or not path.is_file():
        known = sorted(found.stem for found in EXPERIMENTS.glob("*.yaml"))
        raise ConfigError(f"no experiment {shown(name)!r}; expected one of {', '.join(known)} "
                          "(experiments/<name>.yaml)")
    return path


def _check_yaml(path: Path) -> None:
    """ConfigError where the experiment's file is not a YAML mapping (Hydra's own error would
    come from deep inside its config loader)."""
    try:
        found = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        where = getattr(error, "problem_mark", None)
        raise ConfigError(f"{path} is not YAML ({type(error).__name__}"
                          + (f" at line {where.line + 1}, column {where.column + 1}" if where
                             else "") + f": {getattr(error, 'problem', None) or error}); expected "
                          "a mapping of config keys (see experiments/demo.yaml): fix it") from None
    if not isinstance(found, dict):
        raise ConfigError(f"{path} holds a {type(found).__name__}, not a mapping of config keys; "
                          "expected `defaults:` and keys as in experiments/demo.yaml: fix it")


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def cells(sweep_config: DictConfig) -> list[DictConfig]:
    """Every job of the multirun, composed, in Hydra's order (hydra.job.num)."""
    loader = GlobalHydra.instance().config_loader()
    # As BasicSweeper.sweep: the sweeper's params first, the command line's overrides after.
    params = sweep_config.hydra.sweeper.params or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(sweep_config.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    jobs = BasicSweeper.split_arguments(overrides, max_batch_size=None)[0]
    composer = Composer(loader, sweep_config)
    workers = min(usable_cores(), len(jobs) // JOBS_PER_WORKER)
    if workers < 2 or sys.platform != "linux":
        return [composer.job(job) for job in jobs]
    # A large grid's jobs are shared among the cores by forked workers, which have Hydra's state
    # already and send back each job's config, in Hydra's order. Each composes its own share of
    # the grid's choices of groups: contiguous chunks, as a grid's jobs with the same choices are.
    global _COMPOSING
    _COMPOSING = composer
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_composed, jobs, chunksize=math.ceil(len(jobs) / workers))
    finally:
        _COMPOSING = None


# Fewer, and a worker's start and the configs' pickling take what it saves; and a fork of a process
# with threads (a test session's) may inherit a lock another thread held: at 4, a 9-job grid's
# forked worker hung the whole suite.
JOBS_PER_WORKER = 16
_COMPOSING = None  # the Composer, for the forked workers


def _composed(job: list[str]) -> DictConfig:
    """In a forked worker: one job's config."""
    return _COMPOSING.job(job)


class Composer:
    """`job(overrides)`: a sweep's job, composed as Hydra's load_sweep_config composes it, sooner.

    Hydra composes each job from nothing: its defaults list and every file merged, about a sixth
    of a second of one core (full_grid's 288 jobs: 48 s). Yet jobs that choose the same config
    groups differ only in their value overrides (method.r=8), which Hydra applies last, to the
    composed config. So each choice of groups is composed once, and a job is a copy of it with
    its value overrides applied by Hydra's own code and the overrides it records (hydra.overrides
    .task, hydra.job.override_dirname) made the job's: the same config (tested against Hydra's)."""

    def __init__(self, loader, sweep_config: DictConfig):
        self.loader, self.sweep_config = loader, sweep_config
        self.parser = OverridesParser.create(config_loader=loader)
        # The groups as Hydra finds them: its repository with the sweep's search path.
        _, self.repository = loader._parse_overrides_and_create_caching_repo(
            sweep_config.hydra.job.config_name, list(sweep_config.hydra.overrides.hydra))
        self.composed = {}  # the overrides that choose groups: the config they compose

    def job(self, overrides: list[str]) -> DictConfig:
        parsed = self.parser.parse_overrides(overrides)
        if any(override.is_hydra_override() for override in parsed):  # may move the search path
            return self.loader.load_sweep_config(self.sweep_config, overrides)
        choosing, values = [], []
        for override in parsed:
            (choosing if self._chooses_group(override) else values).append(override)
        if not values:
            return self.loader.load_sweep_config(self.sweep_config, overrides)
        key = tuple(override.input_line for override in choosing)
        if key not in self.composed:
            self.composed[key] = self.loader.load_sweep_config(self.sweep_config, list(key))
        cfg = copy.deepcopy(self.composed[key])
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        except OmegaConfBaseException as error:  # as Hydra's load_configuration says it
            raise ConfigCompositionException().with_traceback(sys.exc_info()[2]) from error
        naming = cfg.hydra.job.config.override_dirname  # how Hydra writes override_dirname
        with open_dict(cfg.hydra), read_write(cfg.hydra):
            cfg.hydra.overrides.task = overrides
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=parsed, exclude_keys=list(naming.exclude_keys),
                item_sep=naming.item_sep, kv_sep=naming.kv_sep)
        OmegaConf.copy_cache(from_config=self.sweep_config, to_config=cfg)
        return cfg

    def _chooses_group(self, override) -> bool:
        return override.package is not None or self.repository.group_exists(
            override.key_or_group)
