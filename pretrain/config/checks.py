"""Semantic checks of a loaded config: ranges, combinations and cross-section rules, each
failing with a one-line `ConfigError` that names the key. `load_config` runs them."""

from __future__ import annotations

import difflib
import math
from typing import Any

from pretrain.config.schema import CHOICES, Config
from pretrain.errors import CONFIG_OR_DATA_ERROR, HANG_EXIT_CODE, ConfigError


def validate(cfg: Config) -> None:
    """Checks no type system can express; each failure names its key."""
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            names = [str(c) for c in choices]
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key} must be one of {', '.join(names)} (got '{value}'){hint}")
    for keys, ok, what in _RANGES:
        for key in keys:
            value = _get(cfg, key)
            if value is not None and not ok(value):
                raise ConfigError(f"{key} {what} (got {value!r})")

    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.schedule
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})"
        )
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(
            f"model.d_model / model.n_heads must be even for rope (head dim {m.head_dim})"
        )
    if m.n_kv_heads is not None and m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})"
        )
    if d.seq_len > m.max_seq_len:
        what = "the learned position table" if m.position == "learned" else "the model's maximum"
        raise ConfigError(
            f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}), {what}; "
            "raise model.max_seq_len or lower data.seq_len"
        )
    for key, streams in (("data.streams", d.streams), ("data.val_streams", d.val_streams)):
        for i, stream in enumerate(streams):
            if stream.proportion is not None and stream.repeat is not None:
                raise ConfigError(f"{key}[{i}]: give proportion or repeat, not both")
            for name in ("proportion", "repeat"):
                value = getattr(stream, name)
                if value is not None and value <= 0:
                    raise ConfigError(f"{key}[{i}].{name} must be > 0 (got {value})")
            if objstore_like(stream.path) and not stream.path.startswith("s3://"):
                raise ConfigError(
                    f"{key}[{i}].path: only s3:// object stores are supported (got {stream.path})"
                )
    if s.decay_steps is not None and s.decay_steps <= s.warmup_steps:
        raise ConfigError(
            f"schedule.decay_steps ({s.decay_steps}) must be > schedule.warmup_steps ({s.warmup_steps})"
        )
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )
    for i, name in enumerate(cfg.fault.preempt_signals):
        if name not in PREEMPT_SIGNALS:
            raise ConfigError(
                f"fault.preempt_signals[{i}] must be one of {', '.join(PREEMPT_SIGNALS)} (got {name!r})"
            )
    check_moe(cfg)
    check_mesh(cfg)
    c = cfg.checkpoint
    if c.async_save and cfg.parallel.strategy == "zero":
        raise ConfigError(
            "checkpoint.async_save works with parallel.strategy single, ddp or fsdp; "
            "DeepSpeed (zero) writes its own checkpoints: set checkpoint.async_save=false"
        )
    if c.remote is not None and not c.remote.startswith("s3://"):
        raise ConfigError(f"checkpoint.remote must be an s3://bucket/prefix URL (got {c.remote!r})")
    check_eval(cfg)


def check_mesh(cfg: Config) -> None:
    """The mesh's degrees, before any rank starts (their product against the world size and
    tp against a node: `ParallelDims.resolve` and the fsdp strategy, once ranks are known)."""
    p = cfg.parallel
    for key in ("dp_replicate", "dp_shard"):
        value = getattr(p, key)
        if value != -1 and value < 1:
            raise ConfigError(f"parallel.{key} must be >= 1, or -1 for the rest (got {value})")
    if p.tp < 1:
        raise ConfigError(f"parallel.tp must be >= 1 (got {p.tp})")
    if p.tp > 1 and p.strategy != "fsdp":
        raise ConfigError(
            f"parallel.tp={p.tp} (tensor parallelism) needs parallel.strategy=fsdp "
            f"(got {p.strategy})"
        )
    if p.tp > 1:
        check_tp(p.tp, cfg)
    if p.strategy != "fsdp" and (p.dp_replicate != 1 or p.dp_shard != -1):
        key = "dp_replicate" if p.dp_replicate != 1 else "dp_shard"
        raise ConfigError(
            f"parallel.{key}={getattr(p, key)} lays out the mesh of FSDP/HSDP and needs "
            f"parallel.strategy=fsdp (got {p.strategy})"
        )


def check_moe(cfg: Config) -> None:
    """model.moe against the model, and expert parallelism (parallel.ep) against the mesh
    (ep dividing dp_shard: `ParallelDims.resolve`, once the ranks are known)."""
    m, p = cfg.model, cfg.parallel
    moe = m.moe
    if moe.enabled:
        if moe.top_k > moe.experts:
            raise ConfigError(
                f"model.moe.top_k={moe.top_k} exceeds model.moe.experts={moe.experts}: a token "
                "picks top_k different experts"
            )
        if m.mlp != "swiglu":
            raise ConfigError(
                f"model.moe needs model.mlp=swiglu (got {m.mlp}): experts are SwiGLUs"
            )
        if p.tp > 1:
            raise ConfigError(
                f"parallel.tp={p.tp} with model.moe is not supported yet (experts are not split "
                "by tensor parallelism): use parallel.tp=1 and parallel.ep for the experts"
            )
        if not m.moe_layers():
            raise ConfigError(
                f"model.moe.first_dense={moe.first_dense} and model.moe.every={moe.every} leave "
                f"no MoE block among the {m.n_layers}; lower them or set model.moe.experts=0"
            )
    if p.ep == 1:
        return
    if not moe.enabled:
        raise ConfigError(f"parallel.ep={p.ep} splits experts: set model.moe.experts (got 0)")
    if p.strategy != "fsdp":
        raise ConfigError(
            f"parallel.ep={p.ep} (expert parallelism) needs parallel.strategy=fsdp (got "
            f"{p.strategy}); {p.strategy} trains a MoE model with parallel.ep=1"
        )
    if moe.experts % p.ep:
        raise ConfigError(
            f"model.moe.experts={moe.experts} does not divide by parallel.ep={p.ep}: each "
            "expert-parallel rank holds an equal share of the experts"
        )


def check_tp(tp: int, cfg: Config) -> None:
    """What tensor parallelism over `tp` ranks splits must divide by it: query and kv heads
    (whole heads per rank), the vocabulary (embedding and head rows), the MLP's hidden size
    and the sequence (sequence-parallel norms)."""
    m = cfg.model
    sizes = [
        ("model.n_heads", m.n_heads),
        ("model.n_kv_heads", m.kv_heads),
        ("model.vocab_size", m.vocab_size),
        ("model.mlp_hidden", m.hidden_dim),  # derived from d_model when not set
        ("data.seq_len", cfg.data.seq_len),
        ("model.max_seq_len", m.max_seq_len),  # evaluation pads up to a multiple of tp
    ]
    for key, size in sizes:
        if size % tp:
            derived = (
                " (from model.d_model)" if key == "model.mlp_hidden" and not m.mlp_hidden else ""
            )
            raise ConfigError(
                f"{key}={size}{derived} does not divide by parallel.tp={tp}: tensor parallelism "
                f"gives each of the {tp} ranks an equal part; use a tp that divides {size}"
            )
    if m.position == "learned":
        raise ConfigError(
            f"parallel.tp={tp} with model.position=learned is not supported yet (the table "
            "would be added to sequence-parallel shards); use rope or alibi, or tp=1"
        )


TASK_TYPES = ("multiple_choice", "language_modeling")


def check_eval(cfg: Config) -> None:
    e = cfg.eval
    if e.every < 0 or e.batch_size < 1:
        key, v = ("eval.every", e.every) if e.every < 0 else ("eval.batch_size", e.batch_size)
        raise ConfigError(f"{key} must be {'>= 0' if key == 'eval.every' else '> 0'} (got {v})")
    names: dict[str, int] = {}
    for i, task in enumerate(e.tasks):
        key = f"eval.tasks[{i}]"
        if task.type not in TASK_TYPES:
            raise ConfigError(
                f"{key}.type must be one of {', '.join(TASK_TYPES)} (got {task.type!r})"
            )
        metrics = ("", "acc", "acc_norm") if task.type == "multiple_choice" else ("", "acc")
        if task.metric not in metrics:
            raise ConfigError(
                f"{key}.metric must be one of {', '.join(m for m in metrics if m)} for a "
                f"{task.type} task (got {task.metric!r})"
            )
        for name in ("num_fewshot", "limit"):
            if getattr(task, name) < 0:
                raise ConfigError(f"{key}.{name} must be >= 0 (got {getattr(task, name)})")
        if objstore_like(task.path) and not task.path.startswith("s3://"):
            raise ConfigError(
                f"{key}.path: only s3:// object stores are supported (got {task.path})"
            )
        name = task_name(task)
        if name in names:
            raise ConfigError(
                f"{key} and eval.tasks[{names[name]}] are both named {name!r}; give one a name"
            )
        names[name] = i


def task_name(task) -> str:
    """A task's name in metrics: its `name`, else its file's stem."""
    if task.name:
        return task.name
    stem = task.path.rstrip("/").rsplit("/", 1)[-1]
    return stem[: -len(".jsonl")] if stem.endswith(".jsonl") else stem.rsplit(".", 1)[0]


def objstore_like(path: str) -> bool:
    return "://" in path


def _positive(v: float) -> bool:
    return v > 0 and math.isfinite(v)


def _non_negative(v: float) -> bool:
    return v >= 0 and math.isfinite(v)


def _unit(v: float) -> bool:
    return 0 <= v < 1


# (keys, predicate, what the predicate demands); None values (optional keys) are skipped.
_RANGES = (
    (
        (
            "model.vocab_size",
            "model.d_model",
            "model.n_layers",
            "model.n_heads",
            "model.n_kv_heads",
            "model.max_seq_len",
            "model.sliding_window",
            "model.mlp_hidden",
            "model.mlp_multiple_of",
            "model.rope_theta",
            "model.init_std",
            "model.norm_eps",
            "model.moe.top_k",
            "model.moe.expert_hidden",
            "model.moe.every",
            "model.moe.routed_scale",
            "parallel.ep",
            "data.seq_len",
            "data.num_canonical_nodes",
            "train.max_steps",
            "train.global_batch_size",
            "train.micro_batch_size",
            "train.eval_every",
            "train.log_every",
            "checkpoint.keep_last",
            "optim.lr",
            "optim.eps",
            "data.download_timeout",
            "parallel.activation_checkpointing_every",
            "fault.collective_timeout_s",
            "checkpoint.remote_min_mb_per_s",
            "checkpoint.remote_threads",
        ),
        _positive,
        "must be > 0",
    ),
    (
        (
            "train.eval_batches",
            "checkpoint.every",
            "schedule.warmup_steps",
            "data.num_workers",
            "data.download_retry",
            "optim.weight_decay",
            "optim.grad_clip",
            "parallel.threads",
            "parallel.loss_chunk_tokens",
            "fault.preempt_grace_s",
            "fault.watchdog_s",
            "fault.max_bad_steps",
            "model.moe.experts",
            "model.moe.shared_experts",
            "model.moe.first_dense",
            "model.moe.bias_update_rate",
            "model.moe.aux_loss_coef",
            "model.moe.z_loss_coef",
        ),
        _non_negative,
        "must be >= 0",
    ),
    (("model.dropout", "optim.beta1", "optim.beta2"), _unit, "must be in [0, 1)"),
    (("schedule.min_lr_ratio",), lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    (("model.rope_scale",), lambda v: v >= 1, "must be >= 1 (a position interpolation factor)"),
    (
        ("fault.requeue_exit_code",),
        lambda v: 3 <= v <= 255 and v != HANG_EXIT_CODE,
        f"must be in 3..255 and not {HANG_EXIT_CODE} (1 is an error, {CONFIG_OR_DATA_ERROR} bad input, "
        f"{HANG_EXIT_CODE} a hang)",
    ),
)
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT", "SIGURG")


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
