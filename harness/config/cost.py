"""What a run cost: the price of a GPU-hour (conf/cost/), and from it the run's cost_usd
(training wall time x price) and train_tokens_per_usd. The study chose its machine by this: about
5,000K training tokens per US dollar on an AWS g5.xlarge, against 520K for a hosted chat model.
"""

from harness.core.errors import ConfigError

# The study's figures, for the report: training tokens per US dollar.
STUDY_TOKENS_PER_USD = {"AWS g5.xlarge (one A10G), the study's": 5_000_000,
                        "a hosted chat model's fine-tuning, per the study": 520_000}


def check(cost_cfg) -> None:
    """cost.instance among cost.prices (the price's range is its declaration's)."""
    if cost_cfg.instance is not None and cost_cfg.instance not in cost_cfg.prices:
        raise ConfigError(f"cost.instance={cost_cfg.instance!r}; expected one of "
                          f"{', '.join(cost_cfg.prices)} (conf/cost/default.yaml), or set "
                          "cost.usd_per_hour")


def price(cost_cfg, gpu_name: str | None) -> tuple[float, str] | None:
    """(US dollars per GPU-hour, where that price comes from), or None when nothing says."""
    if cost_cfg.usd_per_hour is not None:
        return float(cost_cfg.usd_per_hour), "cost.usd_per_hour"
    if cost_cfg.instance is not None:
        return float(cost_cfg.prices[cost_cfg.instance].usd_per_hour), cost_cfg.instance
    for instance, entry in cost_cfg.prices.items():
        if gpu_name is not None and entry.gpu == gpu_name:
            return float(entry.usd_per_hour), f"{instance} ({gpu_name})"
    return None


def of_run(usd_per_hour: float, train_time_s: float, train_tokens: float) -> dict:
    """cost_usd and train_tokens_per_usd of a run that trained for train_time_s."""
    cost_usd = train_time_s / 3600 * usd_per_hour
    return {"cost_usd": cost_usd,
            "train_tokens_per_usd": train_tokens / cost_usd if cost_usd > 0 else 0.0}
