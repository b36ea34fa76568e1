"""`python -m harness.estimate <overrides>`: one cell's estimated peak GPU memory.

    python -m harness.estimate model=flan-t5-xl method=lora precision=int8 train.batch_size=8

prints the cell's breakdown (harness/estimate/estimate.py says what each part holds); its last
line is a JSON object of the parts in MiB.
"""

import json
import sys

from hydra import compose, initialize_config_dir

from harness.config import identity, validation
from harness.core.errors import ConfigError, refused
from harness.core.options import CONF_DIR
from harness.data import encoding
from harness.estimate.estimate import PARTS, gpu_peak_mib
from harness.strategy.sizes import world_size


def main(argv: list[str]) -> int:
    """One cell's estimate, its parts as JSON last."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=argv)
    try:
        validation.validate(cfg)
        invalid = validation.invalid_cell_reason(cfg)
        if invalid:
            raise ConfigError(invalid)
        lengths, lengths_from = encoding.planned_lengths(cfg.data, cfg.model, cfg.cache_dir)
        if lengths is None:
            raise ConfigError(f"no estimate: {lengths_from}")
    except ConfigError as error:
        return refused(error)
    cell_cfg = identity.cell_config(cfg)
    parts = {name: round(value, 1) for name, value in
             gpu_peak_mib(cell_cfg, lengths, cfg.cache_dir).items()}
    print(f"{identity.run_name(cell_cfg)}, batch {cfg.train.batch_size}, lengths "
          f"{lengths['source']} / {lengths['target']} ({lengths_from}), gradient checkpointing "
          f"{'on' if cfg.train.gradient_checkpointing else 'off'}:")
    if cfg.strategy.name != "single":
        share = cfg.train.batch_size // world_size(cfg.strategy)
        print(f"  one rank of {identity.strategy_label(cell_cfg['strategy'])}, at its share of "
              f"the batch ({share} examples); total is its GPU's, host what it keeps on the host:")
    for name in (*PARTS, "total", "allocated", "host"):
        print(f"  {name:>13}  {parts[name]:>10,.1f} MiB")
    print(json.dumps(parts))
    return 0



if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
