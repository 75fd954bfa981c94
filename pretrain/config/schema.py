"""The run config's typed schema: one dataclass per section, every field commented (the
config reference (docs/config.md) is generated from these comments by `config.doc`).

`config.load` checks every key of a YAML file or override against these dataclasses before
anything is merged, so a typo is an error naming the key; `config.checks` then checks
values and cross-key rules. All user errors raise `ConfigError` (exit code 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pretrain.errors import REQUEUE_EXIT_CODE
from pretrain.model.config import CHOICES as MODEL_CHOICES
from pretrain.model.config import ModelConfig


@dataclass
class RunConfig:
    # Run name: names the default run directory, the start-up line and the wandb run.
    name: str = "run"
    # Run directory: resolved config, metrics, checkpoints. Re-running into it resumes.
    dir: str = "runs/${run.name}"
    # Seed of the Python, NumPy and torch RNGs (initial weights, dropout) and the data shuffle.
    seed: int = 0
    # Node-local scratch folder for this run's streaming cache and temp files (never the
    # shared run directory: nodes would overwrite each other's downloads, and long paths
    # break DataLoader worker sockets). None: $PRETRAIN_SCRATCH, else /tmp, plus a short
    # folder named after the run directory.
    scratch: str | None = None


@dataclass
class StreamConfig:
    # Dataset root written by `pretrain prep shards` (meta.json + one folder per split): a
    # local folder or s3://bucket/prefix (endpoint and credentials from the environment).
    # (Called `remote` before; that name still loads, with a warning.)
    path: str = "???"
    # Local cache for an s3:// dataset (on each node); default SCRATCH/cache/streamsN (see
    # run.scratch). Unused for local data.
    local: str | None = None
    # Mixture weight: this stream's share of each epoch's samples. Give proportion or repeat,
    # not both; streams can't mix the two kinds. None on every stream: natural sizes.
    proportion: float | None = None
    # Mixture weight as a multiplier on this stream's own samples per epoch (2: each twice,
    # 0.5: a random half). None with no proportion: each sample once.
    repeat: float | None = None


@dataclass
class DataConfig:
    # sentencepiece model from `pretrain prep tokenizer`.
    tokenizer: str = "???"
    # Training datasets; several make a weighted mixture (see proportion / repeat below).
    streams: list[StreamConfig] = field(default_factory=list)
    # Validation data; empty means the val_split of `streams`.
    val_streams: list[StreamConfig] = field(default_factory=list)
    # Tokens per training sequence; must match the shards' packing and be <= model.max_seq_len.
    seq_len: int = 256
    # Split (folder under each stream's root) read for training.
    train_split: str = "train"
    # Split read for validation: from val_streams, or from streams when that is empty.
    val_split: str = "val"
    # Shuffle the training samples (seeded by run.seed); validation never is.
    shuffle: bool = True
    # Fixes the global sample order independently of the number of ranks. None: chosen at
    # the run's first start from its node count and recorded in the run directory, so the
    # order never changes when the run resumes on more or fewer nodes.
    num_canonical_nodes: int | None = None
    # DataLoader worker processes per rank; 0 loads in the training process.
    num_workers: int = 0
    # Allow model.vocab_size > the tokenizer's vocabulary (extra rows are padding).
    allow_vocab_padding: bool = False
    # Check shards against their xxh64: local ones at start-up, downloaded ones on arrival.
    validate_hashes: bool = True
    # Leave out shards found missing, truncated or corrupt at start-up (with a warning)
    # instead of refusing to start.
    skip_bad_shards: bool = False
    # A failed shard download is retried this many times, waiting 1, 2, 4, ... s between.
    download_retry: int = 6
    # Seconds one shard download may take before that attempt fails (and is retried).
    download_timeout: float = 120.0


@dataclass
class OptimConfig:
    # Peak AdamW learning rate, reached at the end of warmup (see schedule).
    lr: float = 3e-4
    # AdamW decay rate of the gradient's running mean (momentum).
    beta1: float = 0.9
    # AdamW decay rate of the squared gradient's running mean.
    beta2: float = 0.95
    # AdamW term added to the denominator for numerical stability.
    eps: float = 1e-8
    # AdamW (decoupled) weight decay on the linear layers' weight matrices.
    weight_decay: float = 0.1
    # Weight decay on norm weights and biases / on embeddings (off by default, as in GPT-3).
    decay_norms_and_biases: bool = False
    # Weight decay on the embeddings too (a tied LM head counts as the embedding).
    decay_embeddings: bool = False
    # Clip the global gradient norm to this value; 0 disables clipping.
    grad_clip: float = 1.0
    # AdamW kernel: fused (one kernel), foreach (multi-tensor) or auto (fused when supported).
    impl: str = "auto"


@dataclass
class ScheduleConfig:
    # After warmup: cosine or linear decay to min_lr_ratio * optim.lr, or constant at optim.lr.
    name: str = "cosine"
    # Optimizer steps of linear warmup from optim.lr / warmup_steps up to optim.lr; 0: none.
    warmup_steps: int = 100
    # The schedule decays to min_lr_ratio * optim.lr at decay_steps (None: train.max_steps).
    min_lr_ratio: float = 0.1
    # Step where the decay reaches its minimum and stays (> warmup_steps); None: max_steps.
    decay_steps: int | None = None


@dataclass
class TrainConfig:
    # Optimizer steps to train for in all; a resumed run continues up to this step.
    max_steps: int = 1000
    # Sequences per optimizer step over all ranks (tokens per step: this * data.seq_len).
    global_batch_size: int = 32
    # Sequences per forward/backward on each rank; gradients accumulate over
    # global_batch_size / (micro_batch_size * ranks) micro-batches per step.
    micro_batch_size: int = 8
    # Evaluate on the validation data every N steps and at the last step.
    eval_every: int = 100
    # Validation micro-batches per evaluation, over all ranks together.
    eval_batches: int = 10
    # Print a progress line every N steps (and the first and last); metrics.jsonl gets every
    # one. Loss and grad norm stay on the device between these points (and are read before
    # every evaluation and checkpoint), so the device never waits for the host in between.
    log_every: int = 10
    # torch.use_deterministic_algorithms; costs speed on GPU, free on CPU.
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    # Save every N steps (0: only at the end) and always at the end of training.
    every: int = 500
    # Keep the newest N complete checkpoints (locally and in remote); older ones are deleted.
    keep_last: int = 3
    # Resume automatically from the latest complete checkpoint in the run directory.
    resume: bool = True
    # single/ddp/fsdp: write model and optimizer shards in the background (DCP async_save).
    # Training goes on once the state is copied to memory; the checkpoint becomes visible
    # at the first step boundary after every rank's write is durable.
    async_save: bool = False
    # s3://bucket/prefix: each complete checkpoint is uploaded there in the background, every
    # rank its own files and rank 0 the manifest last, once all succeeded; a resume downloads
    # the newest one (each rank its share) when the run directory has none as new (a new
    # node, a lost disk). Endpoint and credentials come from the environment.
    remote: str | None = None
    # Slowest per-rank transfer rate (MB/s) to wait for when checkpoint files move to or
    # from `remote`: ranks wait for each other's transfers up to 300 s + size / this rate.
    remote_min_mb_per_s: float = 10.0
    # Requests in flight per rank to and from `remote` (64 MiB parts). The store sees ranks x
    # this at once: boto3's default of 10 makes thousands at 512+ ranks, past S3's per-prefix
    # request rate.
    remote_threads: int = 2


@dataclass
class LoggingConfig:
    # Log metrics to Weights & Biases from rank 0 (see wandb_mode).
    wandb: bool = False
    # wandb project to log to; the wandb run is named after run.name.
    wandb_project: str = "pretrain"
    # offline never needs an account or network; `wandb sync` uploads later.
    wandb_mode: str = "offline"
    # Append every metrics record and event to RUN_DIR/metrics.jsonl (rank 0).
    jsonl: bool = True


@dataclass
class ParallelConfig:
    # single: one process. ddp: data parallel, one process per device under torchrun.
    # fsdp: FSDP2, parameters/gradients/optimizer state sharded across ranks.
    # zero: DeepSpeed ZeRO at zero_stage (1: optimizer state, 2: + gradients, 3: + params).
    strategy: str = "single"
    # fsdp: the ranks as dp_replicate x dp_shard (pretrain/parallel/dims.py). dp_replicate
    # > 1 is HSDP: each group of dp_shard consecutive ranks (one node, say) holds a copy of
    # the model sharded among them; only gradients cross between the dp_replicate copies.
    # -1: world size / dp_shard (elastic jobs: dp_shard = GPUs per node, dp_replicate = -1).
    dp_replicate: int = 1
    # Ranks each copy of the model is sharded over; -1: world size / (dp_replicate x tp).
    dp_shard: int = -1
    # fsdp: tensor (+ sequence) parallel degree, the innermost mesh dimension: each group of
    # tp consecutive ranks splits every block's heads and MLP, the embedding and the output
    # head (over the vocabulary) and reads the same samples. Heads, kv heads, vocab_size and
    # seq_len must divide by it; keep it within a node (NVLink).
    tp: int = 1
    # fsdp with model.moe: expert-parallel degree. Each group of ep consecutive data-parallel
    # ranks splits every MoE layer's routed experts among its members (experts / ep each)
    # and exchanges tokens with an all-to-all; the experts are then sharded by FSDP over the
    # ranks that hold the same ones. Borrows from dp_shard (must divide it) and
    # model.moe.experts; tp must be 1.
    ep: int = 1
    # Allow tp groups that do not fit in one node (their every-layer traffic then crosses
    # the network); refused by default.
    tp_spans_nodes: bool = False
    # DeepSpeed ZeRO stage for strategy zero: 1 shards optimizer state, 2 also gradients,
    # 3 also parameters.
    zero_stage: int = 2
    # Further DeepSpeed config keys for zero, merged over the ones derived from this config.
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # Autocast dtype for forward/backward; weights and optimizer state stay fp32.
    mixed_precision: str = "fp32"
    # Intra-op threads per process; 0 leaves torch's default (one per core).
    threads: int = 0
    # auto: CUDA when every rank sees a GPU, else CPU (all ranks must agree; a rank whose
    # CUDA fails while others have it is an error, never a silent CPU run). cuda: refuse to
    # start without a GPU. cpu: train on CPU (gloo) even when GPUs are present.
    device: str = "auto"
    # fsdp: keep unsharded fp32 gradients across the micro-batches of a step and
    # reduce-scatter once, after the last (less communication, +4 bytes per parameter per
    # rank: for small models). Default: reduce-scatter after every micro-batch.
    fsdp_defer_grad_sync: bool = False
    # Tokens per chunk of the output projection + cross-entropy: logits of at most this
    # many tokens exist at once (never B*T*V in fp32). 0: the whole micro-batch at once.
    loss_chunk_tokens: int = 4096
    # fsdp: free each block's gathered parameters after its forward (less memory, one more
    # all-gather in backward).
    reshard_after_forward: bool = True
    # none, full (every block) or every (each activation_checkpointing_every-th block):
    # recompute those blocks' activations in backward instead of keeping them.
    activation_checkpointing: str = "none"
    # For activation_checkpointing=every: checkpoint each N-th block (blocks N-1, 2N-1, ...).
    activation_checkpointing_every: int = 2
    # torch.compile each transformer block (in place, so checkpoints keep their names). Pays
    # a compile at start-up (tens of seconds) for faster steps; needs a C++ compiler on CPU.
    compile: bool = False


@dataclass
class FaultConfig:
    # Signals that mean "preempted" (of SIGTERM, SIGUSR1, SIGUSR2, SIGINT, SIGHUP, SIGCONT,
    # SIGURG): one step boundary after the signal is seen (the vote on it overlaps a step),
    # every rank saves one checkpoint, then exits.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    # Exit status after a preemption (launchers read it as "requeue me"); 3..255, not 124.
    requeue_exit_code: int = REQUEUE_EXIT_CODE
    # Seconds from the signal to a finished save; past it the process exits anyway with
    # requeue_exit_code (the previous checkpoint stands). 0: no limit.
    preempt_grace_s: float = 120.0
    # No step, evaluation or save finishing for this long: write every thread's Python stack
    # to RUN_DIR/stacks/ and exit with status 124, so a restart can take over. 0: off.
    watchdog_s: float = 900.0
    # Timeout of every collective (and of joining the process group).
    collective_timeout_s: float = 600.0
    # Steps with a non-finite loss or gradient norm are skipped (counted and logged); more
    # than this many in a row stop the run, keeping the last good checkpoint.
    max_bad_steps: int = 3


@dataclass
class EvalTaskConfig:
    # Task file: JSONL in llm-foundry's ICL format, local or s3://. Multiple choice: one
    # {"query", "choices", "gold"} per line; language modelling (cloze): {"context",
    # "continuation"}.
    path: str = "???"
    # Name in metrics (eval/NAME/...), the console and plots; empty: the file's stem.
    name: str = ""
    # multiple_choice: the choice of highest log-likelihood; language_modeling: the greedy
    # continuation equals the given one (exact match).
    type: str = "multiple_choice"
    # Solved examples before each question, drawn from the same file (never the question
    # itself) by a generator seeded with (fewshot_seed, the example's index): the same
    # prompts at any world size.
    num_fewshot: int = 0
    # Seed of the few-shot draw.
    fewshot_seed: int = 1234
    # The score that enters eval/core: acc, or acc_norm (log-likelihood per character of
    # the choice; multiple choice only). Empty: acc_norm for multiple choice, else acc.
    metric: str = ""
    # Score only the first N examples of the file; 0: all.
    limit: int = 0
    # Text before the first example of every prompt (an instruction); empty: none.
    prompt: str = ""
    # Between the few-shot examples and the question.
    example_delimiter: str = "\n\n"
    # Between a question (context) and its answer (continuation).
    continuation_delimiter: str = " "


@dataclass
class EvalConfig:
    # Downstream tasks scored during training (see `pretrain eval` for a checkpoint).
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    # Score the tasks every N steps and at the last step; 0: only as at_checkpoint says.
    every: int = 0
    # Also score them at every checkpoint save (not at a preemption's save).
    at_checkpoint: bool = False
    # Scored sequences (one per choice) per forward on each rank. Examples are dealt to
    # ranks in fixed global batches of this size, so scores are the same bit for bit at any
    # world size or train.micro_batch_size.
    batch_size: int = 16

    @property
    def in_training(self) -> bool:
        """Whether training scores `tasks` between steps: the trainer and the planner ask."""
        return bool(self.tasks) and bool(self.every or self.at_checkpoint)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    **{f"model.{key}": values for key, values in MODEL_CHOICES.items()},
    "optim.impl": ("auto", "fused", "foreach"),
    "schedule.name": ("cosine", "linear", "constant"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "parallel.strategy": ("single", "ddp", "fsdp", "zero"),
    "parallel.device": ("auto", "cuda", "cpu"),
    "parallel.mixed_precision": ("fp32", "bf16"),
    "parallel.activation_checkpointing": ("none", "full", "every"),
    "parallel.zero_stage": (1, 2, 3),
}
