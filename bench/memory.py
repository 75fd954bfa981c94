"""Per-rank memory of parameters + gradients + optimizer state, per parallel strategy.

For each strategy (ddp, fsdp, DeepSpeed ZeRO stages 1-3), 2 ranks under torchrun build a
~100M-parameter fp32 model through the trainer's own strategy code, take two real
training steps of 2 micro-batches per rank on the demo data, and count the bytes each
rank holds. The ratio sharded/ddp of the largest rank is the point. Two variants show
what the cluster-scale fixes changed: `fsdp-defer` reduce-scatters gradients once per
step (parallel.fsdp_defer_grad_sync, fsdp's default before), `zero-3-whole` builds the
whole model on each rank and lets DeepSpeed partition it (zero-3's setup before).

How the bytes are counted. Each rank takes a census of tensor storages twice, right after
backward and right after the optimizer step. Every storage is counted once, at its full
allocated size (a view into a flat buffer counts the buffer, once), under the first of
these categories that reaches it:
  params  the model's parameters as the rank holds them: the full tensors (ddp, and
          zero-1/2, whose parameters are views into DeepSpeed's flat buffers), the local
          shard (fsdp: each DTensor's local tensor), or DeepSpeed's partition `ds_tensor`
          plus any parameter it keeps gathered (zero-3: small "persistent" ones);
  grads   each parameter's `.grad` (the local shard for fsdp) and `.grad_accum`, and
          where DeepSpeed's ZeRO optimizer keeps gradients: `averaged_gradients`,
          `all_grad_tensors` and `grads_in_partition` (stages 1/2),
          `grad_partitions_flat_buffer` and its
          per-parameter views (stage 3), and the `.grad` of its fp32 partitions;
  master  tensors the torch optimizer updates (its param_groups and state keys) that
          are not the model's own: DeepSpeed's flat fp32 partitions
          (`single_partition_of_fp32_groups`, stages 1/2; `fp32_partitioned_groups_flat`,
          stage 3). Stages 1/2 keep a copy; for an fp32 model stage 3 reuses the
          parameter partition as master, which DeepSpeed 0.19.8 means to do but never does
          (it tests a torch.device against a str); pretrain/parallel/zero.py makes the
          test work, so zero-3 shows no master bytes;
  optim   the torch optimizer's state (AdamW exp_avg and exp_avg_sq, and step);
  buffers everything else found by walking the attributes of the engine, the optimizer
          wrapper and the FSDP states: communication buckets (DeepSpeed's `ipg_buckets`,
          sized by `reduce_bucket_size`), RoPE tables; for ddp, its C++ reducer's
          gradient buckets, which Python cannot reach, are taken from
          `_get_ddp_logging_data()["bucket_sizes"]`.
A third census, between the two micro-batches of a step, gives "grads between": the
gradients a rank holds while it accumulates (for fsdp also the unsharded gradients FSDP
keeps on its unsharded parameters when the reduce-scatter is deferred). "build peak" is
the rank's peak resident memory (Linux VmHWM, reset first) while the strategy builds the
model, above what it held before; workers run with MALLOC_MMAP_THRESHOLD_=65536, so that
a freed tensor's memory goes back to the system instead of staying resident in malloc's
heap (this model's tensors are small enough for that), and ZeRO's first collectives run
before the measurement (their buffers are not the model's).
Each category's figure is the larger of its two censuses; "state" = params + grads +
master + optim is what the ratio compares; buffers are shown apart, since their size is a
setting, not model state. Tensors allocated and freed inside backward or step (fsdp's
all-gathered parameters, gradients before DeepSpeed reduces them into its partitions,
activations) are in neither census, for any strategy; "step peak" covers them: a second
training step runs under the torch profiler (profile_memory), and the highest running sum
of its allocations minus frees is added to what the rank held after the first step (all
five categories). It is what torch's allocator had out at the top of a steady step,
activations of this 1 x 256-token micro-batch included; gloo's own buffers are not torch
tensors and are in no figure. `torch.empty` on CPU commits pages only when written, so a
large, partly used buffer adds less to the peak RSS (printed for reference) than to the
counts.

    python bench/memory.py [--strategies ddp fsdp ... zero-3-whole] [--layers 14]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import torch
from multirank import REPO, STRATEGIES, ensure_demo_data, torchrun

MODEL = [
    "model.d_model=768", "model.n_layers={layers}", "model.n_heads=12", "model.n_kv_heads=null",
    "model.vocab_size=4096", "model.max_seq_len=256", "data.seq_len=256",
    "train.global_batch_size=4", "train.micro_batch_size=1", "train.eval_batches=1",
]  # fmt: skip
# The strategies, and the two "before" variants (see the docstring).
VARIANTS = {
    **STRATEGIES,
    "fsdp-defer": [*STRATEGIES["fsdp"], "parallel.fsdp_defer_grad_sync=true"],
    "zero-3-whole": STRATEGIES["zero-3"],
}
CATEGORIES = ("params", "grads", "master", "optim", "buffers")
# Where DeepSpeed's ZeRO optimizers (0.19: DeepSpeedZeroOptimizer for stages 1/2,
# DeepSpeedZeroOptimizer_Stage3) keep gradients.
DEEPSPEED_GRADS = (
    "averaged_gradients",
    "all_grad_tensors",  # stage 2: this rank's gradients between micro-batches
    "grads_in_partition",
    "grad_partitions_flat_buffer",
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
)
# DeepSpeed's flat fp32 partitions, the tensors its torch optimizer updates.
DEEPSPEED_MASTERS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
# Objects whose attributes the buffers walk follows (not process groups, loggers, ...).
WALKED_MODULES = ("deepspeed", "torch.nn", "torch.optim", "torch.distributed.fsdp", "pretrain")


class StorageCensus:
    """Unique tensor storages, each counted once under the first category that reaches it."""

    def __init__(self) -> None:
        self.storages: dict[int, tuple[str, int, str]] = {}  # data_ptr -> (category, bytes, path)

    def add(self, category: str, obj, path: str, deep: bool = False) -> None:
        """Count the tensors in `obj` (a tensor, or containers of them); `deep` also follows
        tensors' `.grad` and attributes and the attributes of library objects."""
        stack, visited = [(obj, path, 0)], set()
        while stack:
            obj, path, depth = stack.pop()
            if obj is None or id(obj) in visited or depth > 16:
                continue
            visited.add(id(obj))
            if isinstance(obj, torch.Tensor):
                self._count(category, obj, path)
                if deep:
                    if obj.is_leaf and obj.grad is not None:
                        stack.append((obj.grad, f"{path}.grad", depth + 1))
                    stack += [(v, f"{path}.{k}", depth + 1) for k, v in vars(obj).items()]
            elif isinstance(obj, dict):
                stack += [(v, f"{path}[{_key(k)}]", depth + 1) for k, v in obj.items()]
            elif isinstance(obj, (list, tuple, set)):
                stack += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
            elif deep and type(obj).__module__.startswith(WALKED_MODULES):
                attrs = getattr(obj, "__dict__", {})
                stack += [(v, f"{path}.{k}", depth + 1) for k, v in attrs.items()]

    def add_bytes(self, category: str, nbytes: int, path: str) -> None:
        """Bytes Python cannot reach as tensors (a C++ buffer)."""
        self.storages[-len(self.storages) - 1] = (category, nbytes, path)

    def _count(self, category: str, t: torch.Tensor, path: str) -> None:
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self.storages:
            self.storages[storage.data_ptr()] = (category, storage.nbytes(), path)

    def bytes(self, category: str) -> int:
        return sum(n for c, n, _ in self.storages.values() if c == category)

    def largest(self, category: str, n: int = 2) -> list[tuple[int, str]]:
        found = sorted((-b, p) for c, b, p in self.storages.values() if c == category)
        return [(-b, p) for b, p in found[:n]]


def _key(k) -> str:
    return str(k) if isinstance(k, (str, int)) else type(k).__name__


def census(strategy) -> StorageCensus:
    """What this rank holds now, by category (see the module docstring)."""
    model, wrapper = strategy.model, strategy.optimizer
    optimizer = wrapper
    while not isinstance(optimizer, torch.optim.Optimizer):  # DeepSpeed's wraps ours
        optimizer = optimizer.optimizer
    params = dict(strategy.unwrapped.named_parameters())
    c = StorageCensus()
    for name, p in params.items():
        c.add("params", p, name)
        c.add("params", getattr(p, "ds_tensor", None), f"{name}.ds_tensor")
    for name, p in params.items():
        c.add("grads", p.grad, f"{name}.grad")
        c.add("grads", getattr(p, "grad_accum", None), f"{name}.grad_accum")
    for attr in DEEPSPEED_GRADS:
        c.add("grads", getattr(wrapper, attr, None), f"optimizer.{attr}")
    # The tensors the torch optimizer updates. DeepSpeed stage 3 puts its fp32 partitions
    # in param_groups only during the step; its optimizer state stays keyed by them.
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    masters += list(optimizer.state)
    for attr in DEEPSPEED_MASTERS:
        masters += list(getattr(wrapper, attr, []))
    c.add("grads", [p.grad for p in masters], "master.grad")
    c.add("master", masters, "optimizer")
    c.add("optim", list(optimizer.state.values()), "optimizer.state")
    fsdp_states = [m._get_fsdp_state() for m in model.modules() if hasattr(m, "_get_fsdp_state")]
    for i, state in enumerate(fsdp_states):  # gradients kept unsharded between micro-batches
        group = state._fsdp_param_group
        for j, fp in enumerate(group.fsdp_params if group is not None else []):
            c.add("grads", fp.unsharded_accumulated_grad, f"fsdp{i}.{j}.unsharded_accumulated_grad")
            unsharded = getattr(fp, "_unsharded_param", None)
            c.add("grads", getattr(unsharded, "grad", None), f"fsdp{i}.{j}.unsharded.grad")
    c.add("buffers", wrapper, "optimizer", deep=True)
    c.add("buffers", model, "model", deep=True)
    c.add("buffers", fsdp_states, "fsdp_states", deep=True)
    if hasattr(model, "_get_ddp_logging_data"):
        sizes = model._get_ddp_logging_data().get("bucket_sizes", "")
        buckets = sum(int(s) for s in sizes.split(",") if s.strip())
        c.add_bytes("buffers", buckets, "DDP reducer gradient buckets")
    return c


def allocation_peak(fn) -> int:
    """The most bytes torch had allocated while `fn()` ran, above what it held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in changes:  # + allocated, - freed
        level += nbytes
        peak = max(peak, level)
    return peak


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure_build(strategy: str, build_peak: dict) -> None:
    """Record in `build_peak` the peak resident memory while the strategy builds its model,
    above what the rank held before (Linux clear_refs 5 restarts the VmHWM high-water
    mark). For zero-3-whole, build as zero-3 did before: the whole model on every rank
    (DeepSpeed partitions it afterwards)."""
    from pretrain.parallel import DDPStrategy, FSDPStrategy, ZeroStrategy
    from pretrain.parallel.base import new_transformer

    def measured(build):
        def build_model(self):
            if isinstance(self, ZeroStrategy):  # buffers of the first collectives: not the model's
                import deepspeed.comm

                deepspeed.comm.broadcast(torch.zeros(1 << 20), 0)
                deepspeed.comm.barrier()
            Path("/proc/self/clear_refs").write_text("5")
            before = _status_bytes("VmRSS")
            model = build(self)
            build_peak["bytes"] = _status_bytes("VmHWM") - before
            return model

        return build_model

    if strategy == "zero-3-whole":
        ZeroStrategy.build_model = lambda self: new_transformer(self.cfg, self.device)
    for cls in (DDPStrategy, FSDPStrategy, ZeroStrategy):
        cls.build_model = measured(cls.build_model)


def worker(strategy: str, layers: int, out: Path) -> None:
    from pretrain.config.load import load_config
    from pretrain.model import count_params
    from pretrain.train.trainer import Trainer

    overrides = [o.format(layers=layers) for o in MODEL]
    cfg = load_config(
        REPO / "configs/tiny.yaml",
        [*overrides, *VARIANTS[strategy], f"run.dir={out / strategy}"],
    )
    build_peak = {"bytes": 0}
    measure_build(strategy, build_peak)
    trainer = Trainer(cfg)
    s = trainer.strategy
    accum = s.accum_steps

    def next_batch(_: int) -> torch.Tensor:
        return trainer.train_data.next().to(s.device)

    def train_step() -> None:
        s.forward_backward(next_batch, accum)
        s.step(cfg.optim.grad_clip)

    seen = {}

    def next_batch_counted(i: int) -> torch.Tensor:
        if i == accum - 1:  # while the step's gradients accumulate
            seen["between"] = census(s)
        return next_batch(i)

    s.forward_backward(next_batch_counted, accum)
    between, after_backward = seen["between"], census(s)
    s.step(cfg.optim.grad_clip)
    after_step = census(s)
    held = sum(after_step.bytes(c) for c in CATEGORIES)
    peak = held + allocation_peak(train_step)
    row = {
        "strategy": strategy,
        "rank": s.rank,
        "params_m": count_params(cfg.model) / 1e6,
        **{c: max(after_backward.bytes(c), after_step.bytes(c)) for c in CATEGORIES},
        "grads_between": between.bytes("grads"),
        "build_peak": build_peak["bytes"],
        "largest_buffers": max(
            after_backward, after_step, key=lambda x: x.bytes("buffers")
        ).largest("buffers"),
        "peak": peak,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    with open(out / f"{strategy}-rank{s.rank}.json", "w") as f:
        json.dump(row, f)
    trainer.close()


def state_bytes(row: dict) -> int:
    return row["params"] + row["grads"] + row["master"] + row["optim"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.layers, args.out)
        return
    ensure_demo_data()
    rows = {}
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # for the workers (see the docstring)
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            worker_args = ["--worker", strategy, "--layers", str(args.layers), "--out", tmp]
            torchrun(__file__, worker_args, nproc=2, threads=1)
            rows[strategy] = [
                json.loads((Path(tmp) / f"{strategy}-rank{r}.json").read_text()) for r in (0, 1)
            ]
    report(rows)


def report(rows: dict[str, list[dict]]) -> None:
    """The per-rank table, the largest buffers, and each strategy's ratios to ddp."""
    first = next(iter(rows.values()))[0]
    print(
        f"model: {first['params_m']:.1f}M parameters ({first['params_m'] * 4:.0f} MB), fp32, "
        "AdamW, 2 ranks, 2 micro-batches per rank per step"
    )
    print(
        f"{'strategy':>12} {'rank':>4} {'params MB':>10} {'grads MB':>9} {'master MB':>10} "
        f"{'optim MB':>9} {'state MB':>9} {'buffers MB':>11} {'step peak MB':>13} "
        f"{'peak RSS MB':>12} {'grads between MB':>17} {'build peak MB':>14}"
    )
    state, everything, peak, between, build = {}, {}, {}, {}, {}
    for strategy, ranks in rows.items():
        for r in ranks:
            total = state_bytes(r)
            state[strategy] = max(state.get(strategy, 0), total)
            everything[strategy] = max(everything.get(strategy, 0), total + r["buffers"])
            peak[strategy] = max(peak.get(strategy, 0), r["peak"])
            between[strategy] = max(between.get(strategy, 0), r["grads_between"])
            build[strategy] = max(build.get(strategy, 0), r["build_peak"])
            print(
                f"{strategy:>12} {r['rank']:>4} {r['params'] / 1e6:10.1f} "
                f"{r['grads'] / 1e6:9.1f} {r['master'] / 1e6:10.1f} {r['optim'] / 1e6:9.1f} "
                f"{total / 1e6:9.1f} {r['buffers'] / 1e6:11.1f} {r['peak'] / 1e6:13.1f} "
                f"{r['rss'] / 1e6:12.0f} {r['grads_between'] / 1e6:17.1f} "
                f"{r['build_peak'] / 1e6:14.1f}"
            )
    print("largest buffers (rank 0):")
    for strategy, ranks in rows.items():
        found = ", ".join(f"{p} {b / 1e6:.1f} MB" for b, p in ranks[0]["largest_buffers"])
        print(f"{strategy:>12}: {found}")
    whole = first["params_m"] * 4e6  # the whole model's fp32 bytes
    for new, old, what, figure in (
        ("fsdp", "fsdp-defer", "gradients held between micro-batches", between),
        ("zero-3", "zero-3-whole", "peak resident memory while the model is built", build),
    ):
        if new in figure and old in figure:
            print(
                f"{what}, largest rank: {new} {figure[new] / 1e6:.0f} MB "
                f"({figure[new] / whole:.2f} of the whole model), before ({old}) "
                f"{figure[old] / 1e6:.0f} MB ({figure[old] / whole:.2f})"
            )
    if "ddp" in state:
        print("ratio to ddp, largest rank: state = params+grads+master+optimizer state")
        for strategy in state:
            if strategy != "ddp" and strategy in STRATEGIES:
                target = " (target <= 0.55)" if strategy in ("fsdp", "zero-3") else ""
                print(
                    f"{strategy:>12}/ddp: state {state[strategy] / state['ddp']:.3f}{target}, "
                    f"state+buffers {everything[strategy] / everything['ddp']:.3f}, "
                    f"step peak {peak[strategy] / peak['ddp']:.3f}"
                )


if __name__ == "__main__":
    main()
