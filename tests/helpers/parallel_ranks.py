"""Run under torchrun by the parallel tests: build a strategy through its own code, run the
checks named on the command line on every rank, and record what each rank saw.

    torchrun --nproc-per-node N tests/helpers/parallel_ranks.py OUT_DIR CHECK[,CHECK...] key=value ...
    torchrun --nproc-per-node N tests/helpers/parallel_ranks.py --cases OUT_DIR CASE...

Writes OUT_DIR/rank{r}.json: {check: result}. With --cases, each CASE is
`name:CHECK[+CHECK...]:key=value,key=value` and runs in turn in the same processes (one
launch, one process group; each case builds its own strategy) into OUT_DIR/NAME/rank{r}.json.
A case's checks see only its own strategy: run the cases that count every tensor of the
process (accum) first, and ZeRO-3 last (its Init replaces F.linear for the rest of the
process). Checks (each on the strategy the overrides name; batches are random tokens, no
data is read):
  init      the initial weights, gathered, equal a single-process build's bit for bit
  accum     bytes of gradients held between the micro-batches of a step, with the step's
            gradient sync deferred (fsdp_defer_grad_sync) and not
  dropout   a dropout mask drawn after setup, and the sum of all weights
  stage     bytes each rank copies into CPU memory for two async saves (torch profiler),
            the state's whole size, and whether the weights load back exactly
  grads     the dtypes of DeepSpeed's gradient buffers after the first of two
            micro-batches, its communication dtype and the parameters' dtype
  backend   the process group's backend and the strategy's device
  buckets   two synchronised backwards of one micro-batch give identical gradients
  memory    peak resident memory (Linux VmHWM) above the start while the model is built,
            and the whole model's fp32 size. Only the build is measured, so a case whose
            only check is memory stops there: the model is not wrapped (no DeepSpeed
            engine, whose buffers come after the build), and the optimizer holds no state.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss() -> int:
    return _status_kb("VmRSS")


def peak_rss() -> int:
    """The most resident memory this process has had since the last `reset_peak_rss`."""
    return _status_kb("VmHWM")


def reset_peak_rss() -> int:
    """Restart the kernel's high-water mark at the current resident size (Linux
    clear_refs 5); returns that size."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss()


def micro_batch_loss(strategy, cfg) -> torch.Tensor:
    tokens = torch.randint(cfg.model.vocab_size, (cfg.train.micro_batch_size, 17))
    tokens = tokens.to(strategy.device)
    logits = strategy.forward(tokens[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def allocated_and_kept(fn, *args):
    """(bytes torch allocated while `fn(*args)` ran and had not freed when it returned,
    what it returned)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args)
    events = prof.profiler.kineto_results.events()
    return sum(e.nbytes() for e in events if e.name() == "[memory]"), result


def full_weights(strategy) -> dict[str, torch.Tensor]:
    """Every parameter whole, on CPU, in its own dtype, under its plain name (gathered
    where sharded)."""
    model = strategy.unwrapped
    out = {}
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        if hasattr(p, "ds_id"):  # a ZeRO-3 partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().cpu().clone()
        elif hasattr(p, "full_tensor"):  # an FSDP2 DTensor
            out[name] = p.full_tensor().detach().cpu()
        else:
            out[name] = p.detach().cpu().clone()
    return out


def check_init(strategy, cfg) -> bool:
    """Whether the weights equal a single-process build's (cast to the strategy's dtype)."""
    from pretrain.parallel.base import new_transformer

    with torch.random.fork_rng(devices=[]):  # leaves this rank's own RNG stream alone
        torch.manual_seed(cfg.run.seed)
        reference = dict(new_transformer(cfg, torch.device("cpu")).named_parameters())
    mine = full_weights(strategy)
    return mine.keys() == reference.keys() and all(
        torch.equal(mine[k], reference[k].detach().to(mine[k].dtype)) for k in mine
    )


def gradient_bytes() -> int:
    """Bytes of every gradient alive in this process: the `.grad` of each leaf tensor
    Python can reach (parameters, FSDP's unsharded parameters, ...), each storage once
    (a sharded gradient counts its local shard)."""
    storages = {}
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [o for o in objects if isinstance(o, torch.Tensor)]
    for obj in tensors:
        if obj.is_leaf and obj.grad is not None:
            grad = obj.grad.to_local() if hasattr(obj.grad, "to_local") else obj.grad
            storage = grad.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def check_accum(strategy, cfg) -> dict:
    from pretrain.model import count_params

    out = {"param_bytes": count_params(cfg.model) * 4}  # the whole model's, in fp32
    for defer in (False, True):
        cfg.parallel.fsdp_defer_grad_sync = defer
        strategy.backward(micro_batch_loss(strategy, cfg), last=False)
        out["deferred" if defer else "default"] = gradient_bytes()  # between micro-batches
        strategy.backward(micro_batch_loss(strategy, cfg), last=True)
        strategy.optimizer.zero_grad(set_to_none=True)
    return out


def check_dropout(strategy, cfg) -> dict:
    mask = F.dropout(torch.ones(64, device=strategy.device), 0.5) > 0
    weights = full_weights(strategy)
    digest = float(sum(w.double().sum() for w in weights.values()))
    return {"mask": mask.int().tolist(), "weights": digest}


def check_stage(strategy, cfg, out_dir: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(strategy.model, strategy.optimizer)
    tensors = [*msd.values(), *(v for s in osd["state"].values() for v in s.values())]
    whole = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    staged = []
    for step in range(2):  # the second save reuses the first one's buffers
        folder = out_dir / f"ckpt{step}"
        if strategy.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        strategy.barrier()
        nbytes, pending = allocated_and_kept(strategy.save, folder)
        staged.append(nbytes)
        pending.result()
        strategy.barrier()
    before = full_weights(strategy)
    for p in strategy.unwrapped.parameters():  # spoil the weights, then load them back
        p.data.zero_()
    strategy.load(out_dir / "ckpt1")
    after = full_weights(strategy)
    exact = all(torch.equal(before[k], after[k]) for k in before)
    return {"staged": staged, "whole": whole, "reloaded_exactly": exact}


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    flat = getattr(value, "flat_partition", None)  # DeepSpeed's compact gradient partition
    return [flat] if isinstance(flat, torch.Tensor) else []


# Where DeepSpeed 0.19 keeps gradients between micro-batches: stage 3, stages 1/2 (ZeRO
# optimizer, compact fp32 partitions or bf16 ones), and BF16_Optimizer (bf16 stage 1).
DEEPSPEED_GRADS = (
    "grad_partitions_flat_buffer",
    "averaged_gradients",
    "grads_in_partition",
    "fp32_groups_gradients",
)


def check_buckets(strategy, cfg) -> bool:
    """Two synchronised backwards of the same micro-batch give bit-identical gradients (DDP's
    first backward of a start is laid out like every later one)."""
    grads = []
    for _ in range(2):
        torch.manual_seed(100 + strategy.rank)  # the same tokens both times
        strategy.backward(micro_batch_loss(strategy, cfg), last=True)
        grads.append([p.grad.clone() for p in strategy.model.parameters()])
        strategy.model.zero_grad(set_to_none=True)
    return all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def check_grads(strategy, cfg) -> dict:
    strategy.backward(micro_batch_loss(strategy, cfg), last=False)
    engine = strategy.model
    opt = engine.optimizer
    found = {}
    for attr in DEEPSPEED_GRADS:
        dtypes = sorted({str(t.dtype) for t in tensors_in(getattr(opt, attr, None))})
        if dtypes:
            found[attr] = dtypes
    accum = [p.grad_accum for p in engine.module.parameters() if getattr(p, "grad_accum", None)]
    if accum:
        found["grad_accum"] = sorted({str(t.dtype) for t in accum})
    return {
        "buffers": found,
        "optimizer": type(opt).__name__,
        "communication_data_type": str(engine.communication_data_type),
        "param_dtype": str(next(engine.module.parameters()).dtype),
    }


def run_case(out_dir: Path, checks: list[str], overrides: list[str], last: bool) -> None:
    """Build the strategy of `overrides`, run `checks`, write this rank's results; close the
    process group after the `last` case, else only free what this case built."""
    from pretrain.config.load import load_config
    from pretrain.parallel import build_strategy
    from pretrain.parallel.base import Strategy

    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    strategy = build_strategy(cfg)
    results: dict = {}
    if "memory" in checks:  # peak resident memory while the model is built
        build = strategy.build_model

        def build_model():
            model = build()
            results["memory"]["build_peak"] = peak_rss() - results["memory"]["before"]
            return model

        strategy.build_model = build_model
        if checks == ["memory"]:
            strategy.wrap = lambda model, optimizer: (model, optimizer)  # the build is all
        results["memory"] = {"before": reset_peak_rss()}
    strategy.setup()
    if "memory" in checks:
        from pretrain.model import count_params

        results["memory"]["param_bytes"] = count_params(cfg.model) * 4
    for check in checks:
        if check == "init":
            results[check] = check_init(strategy, cfg)
        elif check == "accum":
            results[check] = check_accum(strategy, cfg)
        elif check == "dropout":
            results[check] = check_dropout(strategy, cfg)
        elif check == "stage":
            results[check] = check_stage(strategy, cfg, out_dir)
        elif check == "grads":
            results[check] = check_grads(strategy, cfg)
        elif check == "buckets":
            results[check] = check_buckets(strategy, cfg)
        elif check == "memory":
            pass  # measured around the build, above
        elif check == "backend":
            backend = dist.get_backend() if dist.is_initialized() else None
            results[check] = {"backend": backend, "device": strategy.device.type}
            group = strategy.checkpoint_group  # async saves' own group, when there is one
            if group is not None:
                options = group._get_backend(torch.device("cpu")).options
                results["checkpoint_group_timeout_s"] = options._timeout.total_seconds()
        else:
            raise SystemExit(f"unknown check {check!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    strategy.barrier()
    if last:
        strategy.close()
    else:
        Strategy.close(strategy)  # its staging buffers; the process group stays for the next
        del strategy.model, strategy.optimizer
        gc.collect()


def main() -> None:
    if sys.argv[1] == "--cases":
        out_dir, cases = Path(sys.argv[2]), sys.argv[3:]
        for i, case in enumerate(cases):
            name, checks, overrides = case.split(":", 2)
            print(f"rank {os.environ.get('RANK', '0')}: case {name}", flush=True)  # for failures
            overrides = [kv for kv in overrides.split(",") if kv]
            run_case(out_dir / name, checks.split("+"), overrides, last=i == len(cases) - 1)
    else:
        out_dir, checks, overrides = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
        run_case(out_dir, checks, overrides, last=True)


if __name__ == "__main__":
    main()
