"""Whether the Hugging Face hub answers, asked once before any cell needs it.

A cell that loads flan-t5 or SAMSum from an unreachable hub spends about a minute on retries
before it fails; a sweep would do so for every cell. The runner and the sweep ask here first, and
refuse at once with what to do.
"""

import functools
import os

import huggingface_hub
import requests

from harness.core.errors import ConfigError
from harness.data.sources import from_hub


def needs(cfg) -> list[str]:
    """What this cell would fetch from the hub: model and dataset repositories."""
    wanted = []
    if cfg.model.source == "hub" or (cfg.model.source == "random"
                                     and cfg.model.tokenizer == "hub"):
        wanted.append(f"model {cfg.model.hub_id}")
    if from_hub(cfg.data) and not os.path.isdir(cfg.data.hub_id):
        wanted.append(f"dataset {cfg.data.hub_id}")
    return wanted


def check(cfgs) -> None:
    """ConfigError if a cell needs the hub and the hub does not answer, or needs a gated model
    (model.gated) and no token is set. HF_HUB_OFFLINE=1 says the files are in the local Hugging
    Face cache: then nothing is asked."""
    wanted = sorted({repository for cfg in cfgs for repository in needs(cfg)})
    if not wanted or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    gated = sorted({cfg.model.hub_id for cfg in cfgs
                    if cfg.model.source == "hub" and cfg.model.get("gated")})
    if gated and huggingface_hub.get_token() is None:
        raise ConfigError(
            f"model {', '.join(gated)} is gated on the Hugging Face hub and no token is set: "
            "accept its licence on the model's page (https://huggingface.co/"
            f"{gated[0]}), then log in (hf auth login) or set HF_TOKEN; or measure memory "
            "offline with random weights: model.source=random")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    problem = _unreachable(endpoint)
    if problem:
        raise ConfigError(
            f"{', '.join(wanted)} must come from the Hugging Face hub, and {endpoint} does not "
            f"answer ({problem}). Offline, measure memory and time with random weights and "
            "synthetic data: model.source=random data=synthetic (make sweep ... ARGS=\"...\"); "
            "if the files are in your Hugging Face cache, set HF_HUB_OFFLINE=1")


@functools.cache
def _unreachable(endpoint: str, timeout_s: float = 5.0) -> str:
    """Why the endpoint does not answer, or "" when it does (asked once per process)."""
    try:
        requests.head(endpoint, timeout=timeout_s, allow_redirects=True)
    except requests.RequestException as error:
        return type(error).__name__
    return ""
