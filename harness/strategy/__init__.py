"""The strategy axis (conf/strategy/): one process, or ranks that share a cell's model and its
global batch (DDP, FSDP2, DeepSpeed ZeRO-2/3, with CPU offload), and how they launch.
"""
