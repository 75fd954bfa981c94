"""What the 2-rank benches share: the strategies they compare and how a worker is started.

`bench/memory.py` and `bench/throughput.py` each re-run themselves as a worker under real
torchrun (gloo on CPU, one process per rank), once per strategy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Bench name -> config overrides. zero-N is DeepSpeed ZeRO stage N (pretrain/parallel/zero.py).
STRATEGIES: dict[str, list[str]] = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    **{f"zero-{n}": ["parallel.strategy=zero", f"parallel.zero_stage={n}"] for n in (1, 2, 3)},
}


def ensure_demo_data() -> None:
    if not (REPO / "data/shakespeare/mds/meta.json").exists():
        subprocess.run(["make", "-C", str(REPO), "data/shakespeare/mds/meta.json"], check=True)


def torchrun(script: str, args: list[str], nproc: int = 2, threads: int = 1) -> None:
    """`torchrun --standalone --nproc-per-node NPROC SCRIPT ARGS` with `threads` intra-op
    threads per rank; exits with every rank's output if it fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", script, *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    # As the Makefile does: DeepSpeed's shm_comm op is built once, not in every run.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/pretrain/torch_extensions"))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bench worker failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
