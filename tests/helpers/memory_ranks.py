"""Run under torchrun by tests/test_planner_memory.py: the memory a real rank holds in a steady
training step, by torch's own allocator accounting, to hold the planner's trace against.

    torchrun --nproc-per-node N tests/helpers/memory_ranks.py OUT_DIR CONFIG CASE... [-- K=V...]

Each CASE is `name:key=value,key=value` (overrides of that case; those after `--` apply
to every case). For each case in turn, every rank builds the real strategy
(`build_strategy`, `setup`) and takes two optimizer steps exactly as the planner traces one
(`pretrain.planner.trace.train_step`) on random tokens, and writes
OUT_DIR/NAME/rank{r}.json with the live bytes (`Window.summary`): after the build, after
step 1, at the start of step 2, and the peaks of steps 1 and 2 (step 2 is the steady one:
AdamW made its state in step 1), then, when the config scores eval.tasks during training,
the peak of one scoring forward after step 2 as the planner traces it
(`pretrain.planner.trace.eval_forward` on its `eval_batch`). tests/test_planner_memory.py
calls `measure` in its own process for parallel.strategy=single.

Why the profiler, not RSS: gloo, Python, DeepSpeed's extension and freed-but-kept heap
pages all move the resident size. torch's CPU allocator counts the bytes of the blocks it
has handed out and not taken back (`counting_all_threads`), and the profiler
(`profile_memory`) records that count at every allocation and free: the tensor memory of
this rank, which is what the planner counts, no more. The window opens before the strategy
is built, so every byte of the model, the optimizer, the buffers of DDP, FSDP and DeepSpeed
is seen; what was live when it opened (what earlier cases of the launch left behind, e.g.
DeepSpeed engines that stay referenced) is subtracted (`before` in the results).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MARKS = ("build", "step1", "step2", "eval")  # record_function names of the window's phases


def parse_cases(args: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """([(case name, its overrides)], overrides common to every case) from the command line."""
    common: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, common = args[:cut], args[cut + 1 :]
    cases = []
    for arg in args:
        name, _, rest = arg.partition(":")
        cases.append((name, [kv for kv in rest.split(",") if kv]))
    return cases, common


@contextlib.contextmanager
def counting_all_threads():
    """While inside, torch's CPU allocator counts the live bytes of every thread's blocks.

    Without c10's flag `caffe2_report_cpu_memory_usage` the allocator keeps its count (and
    the table of block sizes behind it) only on the thread that profiles: a block this
    thread allocates and a gloo thread releases (the last reference to a collective's
    tensor is often dropped there, at random) would stay counted for ever, a whole model's
    size too much on some runs. With the flag every thread's blocks are counted, and each
    allocation event the profiler records carries the count. Python cannot set c10 flags;
    this one is a plain exported bool of libc10.
    """
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    flag = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage")
    saved, flag.value = flag.value, True
    try:
        yield
    finally:
        flag.value = saved


class Window:
    """What the profiler saw of one case: the live bytes after each allocation event (the
    allocator's count, less what was live when the window opened) and the phases' spans."""

    def __init__(self, prof) -> None:
        events: list[tuple[int, int, int, int]] = []  # (time, size, count after it, address)
        self.spans: dict[str, tuple[int, int]] = {}
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            fields = e.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation":
                if fields.device.type == "cpu":
                    events.append(
                        (e.start_time_ns, fields.alloc_size, fields.total_allocated, fields.ptr)
                    )
            elif e.name in MARKS:
                self.spans[e.name] = (e.start_time_ns, e.end_time_ns)
        events.sort()
        _, size, count, _ = events[0]
        self.before = count - size  # live when the window opened (earlier cases' leftovers)
        self.timeline = [(t, c - self.before) for t, _, c, _ in events]
        # Frees this thread saw of blocks it did not see allocated: blocks from before the
        # window (which make the count too low: should stay 0) or of another thread.
        ours: set[int] = set()
        self.freed_unseen = 0
        for _, size, _, ptr in events:
            if size > 0:
                ours.add(ptr)
            elif ptr in ours:
                ours.remove(ptr)
            else:
                self.freed_unseen -= size

    def at(self, when: int) -> int:
        """Bytes live at `when` (after every event up to it)."""
        i = bisect.bisect_right(self.timeline, (when, float("inf")))
        return self.timeline[i - 1][1] if i else 0

    def peak(self, mark: str) -> int:
        start, end = self.spans[mark]
        i, j = (bisect.bisect_left(self.timeline, (t, -1)) for t in (start, end + 1))
        return max([self.at(start), *(live for _, live in self.timeline[i:j])])

    def summary(self) -> dict[str, int]:
        evals = {"peak_eval": self.peak("eval")} if "eval" in self.spans else {}
        return {
            **evals,
            "after_build": self.at(self.spans["build"][1]),
            "peak_step1": self.peak("step1"),
            "after_step1": self.at(self.spans["step1"][1]),
            "start_step2": self.at(self.spans["step2"][0]),
            "peak_step2": self.peak("step2"),
            "before": self.before,
            "freed_unseen": self.freed_unseen,
        }


def random_batches(cfg, n: int) -> list[torch.Tensor]:
    """`n` micro-batches of random tokens, (micro_batch_size, seq_len + 1) each."""
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len + 1)
    return [torch.randint(cfg.model.vocab_size, shape) for _ in range(n)]


def measure(cfg) -> tuple[dict[str, int], object]:
    """Build the real strategy of `cfg` and take two steps under the profiler; the live
    bytes of this rank (`Window.summary`) and the strategy (still open)."""
    from pretrain.parallel import build_strategy
    from pretrain.planner.trace import eval_batch, eval_forward, train_step

    gc.collect()  # what earlier cases left is freed before the window, not inside it
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("build"):
            strategy = build_strategy(cfg)
            strategy.setup()
        for mark in ("step1", "step2"):
            batches = random_batches(cfg, strategy.accum_steps)
            with record_function(mark):
                train_step(strategy, batches, cfg)
            del batches
        if cfg.eval.in_training:
            inputs, targets = eval_batch(cfg)
            with record_function("eval"):
                eval_forward(strategy, inputs, targets)
            del inputs, targets
    return Window(prof).summary(), strategy


def measure_in_this_process(cfg) -> dict[str, int]:
    """`measure` here, with one intra-op thread as each rank has (2 threads on 2 busy cores
    run 20x slower), this process's RNG left as it was; the strategy closed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), counting_all_threads():
            result, strategy = measure(cfg)
        strategy.close()
    finally:
        torch.set_num_threads(threads)
    return result


def main() -> None:
    out_dir, config = Path(sys.argv[1]), sys.argv[2]
    cases, common = parse_cases(sys.argv[3:])
    from pretrain.config.load import load_config

    rank = int(os.environ.get("RANK", "0"))
    strategy = None
    for name, overrides in cases:
        cfg = load_config(config, [*common, *overrides])
        start = time.perf_counter()
        result, strategy = measure(cfg)
        result["seconds"] = round(time.perf_counter() - start, 2)
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{rank}.json").write_text(json.dumps(result))
        strategy.barrier()
        del strategy.model, strategy.optimizer  # the group stays for the next case
    if strategy is not None:
        strategy.close()


if __name__ == "__main__":
    with counting_all_threads():
        main()
