"""Know before you launch: the per-rank memory, FLOPs and step time of a config on a
cluster, from one training step of the real model and strategy traced on fake tensors over
a fake process group (trace.py), estimated for the cluster's hardware (estimate.py), with
the smallest fix when it does not fit (fit.py). `pretrain plan CONFIG ...` (cli.py) prints
it; `pretrain launch` and `submit` refuse a config that will not fit."""

from pretrain.planner.plan import Cluster, Plan, plan

__all__ = ["Cluster", "Plan", "plan"]
