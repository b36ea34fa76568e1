"""Where a cell's nodes meet (strategy.nnodes > 1): this node's rank among them and the first
node's address, from the config, else from the SLURM job the node runs in (hydra/launcher=slurm,
one task per node), else from torchrun's MASTER_ADDR, else this machine. The first node's runner
owns the cell's MLflow run; the others only launch their ranks.
"""

import os

LOCAL = "127.0.0.1"


def node_rank(strategy_cfg) -> int:
    """strategy.node_rank, else SLURM_NODEID, else 0."""
    if strategy_cfg.get("node_rank") is not None:
        return int(strategy_cfg["node_rank"])
    return int(os.environ.get("SLURM_NODEID", 0))


def master_addr(strategy_cfg) -> str:
    """strategy.master_addr, else the SLURM job's first host, else MASTER_ADDR, else 127.0.0.1."""
    if strategy_cfg.get("master_addr"):
        return str(strategy_cfg["master_addr"])
    if "SLURM_JOB_ID" in os.environ:
        import submitit  # only inside a SLURM job

        return submitit.JobEnvironment().hostnames[0]
    return os.environ.get("MASTER_ADDR", LOCAL)


def rendezvous(strategy_cfg) -> tuple[str, dict]:
    """The c10d rendezvous's endpoint and configs: one node, any free port of this machine;
    several, the first node's address and strategy.master_port, the first node hosting the
    store."""
    if strategy_cfg["nnodes"] == 1:
        return f"{LOCAL}:0", {}
    return (f"{master_addr(strategy_cfg)}:{strategy_cfg['master_port']}",
            {"is_host": node_rank(strategy_cfg) == 0})
