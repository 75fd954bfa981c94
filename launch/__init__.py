"""Starting training: torchrun on this machine, SLURM jobs, sweeps, and relaunching runs.

Everything here runs outside the training processes: it prepares a run directory, records
how the run was started (`launch.json`) and starts `python -m pretrain train` on every rank.
It may import `pretrain.config` and read what a run writes; `pretrain/` never imports it.
"""
