"""Per-GPU tokens/s and memory that peers published for real Llama-class training runs.

`bench/plan_vs_published.py` sets our planner against these rows, so every figure here is
one read in the source named with it (repository file at a commit, table by name); a field
is None where the source does not give it. Settings a source leaves out but its own config
at that commit fixes (sequence length, precision policy) are taken from that config, as the
comment by each source says. Figures are as printed: tokens/s per GPU, memory in GiB per
GPU, MFU as a fraction with the source's own FLOP count (6N plus attention in torchtitan,
fms-fsdp and llm-foundry; none of them counts recomputation).

What the fields mean:
  ac          none, full (every block), every-2 (every second block, our
              activation_checkpointing=every), selective-op (torch's per-op policy: keeps
              matmul outputs, recomputes the rest; we have no such mode) or selective
              (some blocks, how many not published) or unknown (not in the source)
  precision   bf16: bf16 compute with fp32 sharded parameters and AdamW state (FSDP mixed
              precision or autocast, as ours); bf16-pure: parameters held in bf16; float8:
              float8 matmuls (torchao / Transformer Engine), which we do not model
  shard_group HSDP: FSDP inside groups of this many GPUs, replicated across the groups
  memory_kind reserved: torch.cuda max_memory_reserved (allocator pool, includes its
              fragmentation); active: max active bytes of live tensors
  node_gbit_s a node's network bandwidth to other nodes where the source states it (else
              the planner's reference node for the card: 8 x 400 Gb/s for DGX H100)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Published:
    key: str  # short name for the table
    model: str  # a key of SHAPES
    gpu: str  # our pretrain.hardware name for the card
    gpus: int | None  # GPUs in the job (None: not published)
    parallel: str  # as the source names it
    tp: int = 1
    pp: int = 1
    cp: int = 1
    shard_group: int | None = None
    precision: str = "bf16"
    seq_len: int
    micro_batch: int  # sequences per GPU per forward/backward
    global_batch: int | None = None  # sequences per optimizer step
    grad_accum: int | None = None
    ac: str
    compile: bool | None
    tokens_per_s: float | None  # per GPU
    memory_gib: float | None = None
    memory_kind: str | None = None
    mfu: float | None = None
    source: str
    node_gbit_s: float | None = None
    note: str = ""


# Model shapes as the sources define them, as overrides of our model config.
_LLAMA3 = ["model.vocab_size=128256", "model.rope_theta=500000.0", "model.n_kv_heads=8"]
_LLAMA2 = ["model.vocab_size=32000", "model.rope_theta=10000.0"]
_UNTIED = ["model.position=rope", "model.mlp=swiglu", "model.norm=rmsnorm",
           "model.tie_embeddings=false", "model.bias=false"]  # fmt: skip
# fmt: off
_MPT = ["model.vocab_size=50368", "model.position=learned", "model.mlp=gelu",
        "model.mlp_hidden=null", "model.norm=layernorm", "model.tie_embeddings=true",
        "model.bias=true", "model.n_kv_heads=null"]
_7B = ["model.d_model=4096", "model.n_layers=32", "model.n_heads=32"]
_70B = ["model.d_model=8192", "model.n_layers=80", "model.n_heads=64"]
SHAPES: dict[str, list[str]] = {
    # torchtitan ModelArgs "8B"/"70B" (ffn_dim_multiplier 1.3, multiple_of 1024/4096 ->
    # 14336/28672), vocabulary of the Llama 3 tiktoken tokenizer (128,256 rows).
    "llama3-8b": [*_UNTIED, *_LLAMA3, *_7B, "model.mlp_hidden=14336"],
    "llama3-70b": [*_UNTIED, *_LLAMA3, *_70B, "model.mlp_hidden=28672"],
    # torchtitan llama2 "7B"/"70B", fms-fsdp LLaMAConfig "7b"/"70b" (70b: 8 kv heads).
    "llama2-7b": [*_UNTIED, *_LLAMA2, *_7B, "model.n_kv_heads=null", "model.mlp_hidden=11008"],
    "llama2-70b": [*_UNTIED, *_LLAMA2, *_70B, "model.n_kv_heads=8", "model.mlp_hidden=28672"],
    # llm-foundry scripts/train/yamls/pretrain/mpt-{7b,70b}.yaml on MPTConfig defaults: MHA,
    # GELU MLP 4 x d_model, LayerNorm and linear biases, learned positions, tied embeddings
    # (the table's NumParams, 6,658,859,008 at seq 2048, is this shape's count exactly).
    "mpt-7b": [*_MPT, *_7B],
    "mpt-70b": [*_MPT, *_70B],
    # OLMo-core TransformerConfig.llama3_8B with the dolma2 tokenizer padded to 128 rows.
    "olmo-llama3-8b": [*_UNTIED, *_LLAMA3, *_7B, "model.mlp_hidden=14336",
                       "model.vocab_size=100352"],
}
# fmt: on

_GH = "https://github.com/"
# torchtitan docs/performance.md, "Llama 3 performance numbers" and "Llama 2 performance
# numbers", FSDP2 on 64 A100 80GB; train_configs/llama3_*.toml at that commit: seq 8192,
# compile false; llama2_70b.toml: seq 4096; FSDP2 MixedPrecisionPolicy(param bf16, reduce
# fp32). WPS is logged per GPU (tokens / (time * model-parallel size)).
TT_APR24 = dict(
    gpu="A100-SXM-80GB", gpus=64, parallel="FSDP2", compile=False,
    source=_GH + "pytorch/torchtitan/blob/157a12c562288b3bccb077003a97f18a4ca657aa/docs/performance.md",
)  # fmt: skip
# torchtitan benchmarks/llama3_h100_202412_torchtitan.md (Llama 3.1 8B/70B, Grand Teton:
# H100 96GB HBM2e at 500 W, not the 80GB SXM; torch 1963fc8, torchtitan 9dec370). Memory
# kind is not named in the file; the console log it reads prints max_reserved_gib.
TT_DEC24 = dict(
    gpu="H100", precision="bf16", memory_kind="reserved", note="H100 96GB HBM2e at 500 W",
    source=_GH + "pytorch/torchtitan/blob/b5bcd76c66d0acb1a08b176d9639425bc55e0b2a/"
    "benchmarks/llama3_h100_202412_torchtitan.md",
)  # fmt: skip
TT_ASYNC = _GH + (
    "pytorch/torchtitan/blob/b5bcd76c66d0acb1a08b176d9639425bc55e0b2a/"
    "benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md"
)
# fms-fsdp README "Training throughput benchmarks": Llama 2 shapes, 128 A100 80G (400 Gbps)
# and 96 H100 (800 Gbps), batch 2 per GPU with no accumulation (train_utils: one step per
# batch), seq 4096 (config default); FSDP MixedPrecision bfSixteen (bf16 params, reduce
# and buffers; fp32 sharded master). HSDP shards inside each 8-GPU node.
FMS_MAR24 = _GH + (
    "foundation-model-stack/fms-fsdp/blob/4ffb9bdfa30e957e339ccfbb617a589fd07c495e/README.md"
)
FMS_MAY24 = _GH + (
    "foundation-model-stack/fms-fsdp/blob/ed74fd5ddec00e309eac20f478de883464c86526/README.md"
)
FMS = dict(precision="bf16", micro_batch=2, grad_accum=1, seq_len=4096)
# The README's "(400 Gbps)" and "(800 Gbps)" are the node's network: a quarter of a DGX
# A100's 8 x 200 Gb/s and of a DGX H100's 8 x 400 Gb/s.
FMS_A100_NET, FMS_H100_NET = {"node_gbit_s": 400}, {"node_gbit_s": 800}
# llm-foundry scripts/train/benchmarking/README.md (MPT, seq 2048, FSDP FULL_SHARD,
# Composer amp_bf16 with FSDP mixed precision DEFAULT unless noted; flash attention; no
# torch.compile: neither the yamls nor submit_benchmarks.py at 5e85bd6 set one).
FOUNDRY = dict(
    parallel="FSDP FULL_SHARD", compile=False, seq_len=2048,
    source=_GH + "mosaicml/llm-foundry/blob/8c8dd48f72168c5d51e2f7b151595892a8fba43d/"
    "scripts/train/benchmarking/README.md",
)  # fmt: skip
# OLMo-core README, throughput table ("tokens per second per device", H100), row "8B Llama";
# script src/scripts/train/Llama-8B.py at 41400c4 (the commit that added the row): FSDP,
# param bf16 / reduce fp32, compile, rank micro-batch 2 x 4096 tokens, global 1024 x 4096.
OLMO = _GH + "allenai/OLMo-core/blob/7e58d1289bc27103880e7a8382ad0847c35e04f7/README.md"
# Megatron-Bridge docs/performance-summary.md, "25.11 NeMo Container", System: DGX-H100.
MBRIDGE = _GH + (
    "NVIDIA-NeMo/Megatron-Bridge/blob/00b7660be0254ac6f95f44164ddd0c3e9cc798ed/"
    "docs/performance-summary.md"
)

# fmt: off
PUBLISHED: tuple[Published, ...] = (
    # --- torchtitan, April 2024, 64 A100 80GB, FSDP2, local batch 1 (Llama 3) / 2 (Llama 2)
    Published(key="tt-l3-8b-a100x64-every2", model="llama3-8b", seq_len=8192, micro_batch=1,
              global_batch=64, ac="every-2", tokens_per_s=2904, mfu=0.568, **TT_APR24,
              note="'selective layer' AC: config_manager default selective_ac_option='2'"),
    Published(key="tt-l3-8b-a100x64-selop", model="llama3-8b", seq_len=8192, micro_batch=1,
              global_batch=64, ac="selective-op", tokens_per_s=2973, mfu=0.582, **TT_APR24),
    Published(key="tt-l3-70b-a100x64-full", model="llama3-70b", seq_len=8192, micro_batch=1,
              global_batch=64, ac="full", tokens_per_s=331, mfu=0.517, **TT_APR24),
    Published(key="tt-l2-70b-a100x64-full", model="llama2-70b", seq_len=4096, micro_batch=2,
              global_batch=128, ac="full", tokens_per_s=353, mfu=0.505, **TT_APR24),
    Published(key="tt-l2-70b-a100x64-selop", model="llama2-70b", seq_len=4096, micro_batch=1,
              global_batch=64, ac="selective-op", tokens_per_s=355, mfu=0.508, **TT_APR24,
              note="local batch 1: batch 2 ran out of memory with selective op AC"),
    # --- torchtitan, December 2024, Llama 3.1 8B, seq 8192 (llama3_8b.toml), selective AC
    # (the toml's mode is per-op), local batch 2. Tables 1 (8 GPUs) and 3 (128 GPUs).
    Published(key="tt-l3-8b-h100x8-selop", model="llama3-8b", gpus=8, parallel="FSDP2",
              seq_len=8192, micro_batch=2, global_batch=16, ac="selective-op", compile=False,
              tokens_per_s=5762, memory_gib=82.4, **TT_DEC24),
    Published(key="tt-l3-8b-h100x8-selop-compile", model="llama3-8b", gpus=8,
              parallel="FSDP2", seq_len=8192, micro_batch=2, global_batch=16,
              ac="selective-op", compile=True, tokens_per_s=6667, memory_gib=77.0, **TT_DEC24),
    Published(key="tt-l3-8b-h100x128-selop", model="llama3-8b", gpus=128, parallel="FSDP2",
              seq_len=8192, micro_batch=2, global_batch=256, ac="selective-op", compile=False,
              tokens_per_s=5605, memory_gib=67.0, **TT_DEC24),
    Published(key="tt-l3-8b-h100x128-selop-compile", model="llama3-8b", gpus=128,
              parallel="FSDP2", seq_len=8192, micro_batch=2, global_batch=256,
              ac="selective-op", compile=True, tokens_per_s=6514, memory_gib=62.0, **TT_DEC24),
    Published(key="tt-l3-8b-h100x128-fp8", model="llama3-8b", gpus=128, parallel="FSDP2",
              seq_len=8192, micro_batch=2, global_batch=256, ac="selective-op", compile=True,
              tokens_per_s=8380, memory_gib=61.8, **{**TT_DEC24, "precision": "float8"}),
    # Table 2: 8 GPUs, FSDP 8 / CP 1, seq 32768, compile + float8, full AC, local batch 1.
    Published(key="tt-l3-8b-h100x8-32k-fp8", model="llama3-8b", gpus=8, parallel="FSDP2",
              seq_len=32768, micro_batch=1, ac="full", compile=True, tokens_per_s=3890,
              memory_gib=83.9, **{**TT_DEC24, "precision": "float8"}),
    # Table 4: 70B on 256 GPUs, FSDP 32 x TP 8, compile + float8, full AC.
    Published(key="tt-l3-70b-h100x256-tp8-fp8", model="llama3-70b", gpus=256,
              parallel="FSDP2 32 x TP 8", tp=8, seq_len=8192, micro_batch=16, global_batch=512,
              ac="full", compile=True, tokens_per_s=829, memory_gib=71.9,
              **{**TT_DEC24, "precision": "float8"}),
    # --- torchtitan async-TP benchmark, June 2025, bf16 rows, "Vanilla TP tokens/sec"
    # (torchtitan logs tokens/s per GPU); same Grand Teton H100s.
    Published(key="tt-l3-70b-h100x256-tp8", model="llama3-70b", gpu="H100", gpus=256,
              parallel="FSDP2 32 x TP 8", tp=8, seq_len=8192, micro_batch=16, ac="full",
              compile=True, tokens_per_s=597.3, source=TT_ASYNC,
              note="seq_len from llama3_70b.toml of that date"),
    Published(key="tt-l3-8b-h100x64-tp8", model="llama3-8b", gpu="H100", gpus=64,
              parallel="FSDP2 8 x TP 8", tp=8, seq_len=8192, micro_batch=12,
              ac="selective-op", compile=True, tokens_per_s=4378, source=TT_ASYNC,
              note="seq_len from llama3_8b.toml of that date"),
    # --- fms-fsdp (IBM), Llama 2 shapes, March 2024 (no compile) and May 2024 (compile).
    Published(key="fms-l2-7b-a100x128-hsdp", model="llama2-7b", gpu="A100-SXM-80GB",
              gpus=128, parallel="HSDP", shard_group=8, ac="none", compile=False,
              tokens_per_s=3700, mfu=0.57, source=FMS_MAR24, **FMS, **FMS_A100_NET),
    Published(key="fms-l2-7b-h100x96-hsdp", model="llama2-7b", gpu="H100", gpus=96,
              parallel="HSDP", shard_group=8, ac="none", compile=False, tokens_per_s=7500,
              mfu=0.37, source=FMS_MAR24, **FMS, **FMS_H100_NET),
    Published(key="fms-l2-70b-a100x128-full", model="llama2-70b", gpu="A100-SXM-80GB",
              gpus=128, parallel="FSDP", ac="full", compile=False, tokens_per_s=370,
              mfu=0.50, source=FMS_MAR24, **FMS, **FMS_A100_NET),
    Published(key="fms-l2-70b-h100x96-full", model="llama2-70b", gpu="H100", gpus=96,
              parallel="FSDP", ac="full", compile=False, tokens_per_s=800, mfu=0.34,
              source=FMS_MAR24, **FMS, **FMS_H100_NET),
    Published(key="fms-l2-7b-a100x128-hsdp-compile", model="llama2-7b", gpu="A100-SXM-80GB",
              gpus=128, parallel="HSDP", shard_group=8, ac="none", compile=True,
              tokens_per_s=4550, mfu=0.68, source=FMS_MAY24, **FMS,
              **FMS_A100_NET),
    Published(key="fms-l2-7b-h100x96-hsdp-compile", model="llama2-7b", gpu="H100", gpus=96,
              parallel="HSDP", shard_group=8, ac="none", compile=True, tokens_per_s=9600,
              mfu=0.46, source=FMS_MAY24, **FMS, **FMS_H100_NET),
    Published(key="fms-l2-70b-h100x96-sel-compile", model="llama2-70b", gpu="H100", gpus=96,
              parallel="FSDP", ac="selective", compile=True, tokens_per_s=890, mfu=0.38,
              source=FMS_MAY24, **FMS, **FMS_H100_NET),
    # --- llm-foundry MPT, tables "H100 80GB BF16 (Large Scale, >= 128 GPUs)", "H100 80GB
    # BF16" and "A100 80GB with 1600 Gbps node-node interconnect (RoCE)".
    *(
        Published(key=f"mpt-70b-h100x{n}", model="mpt-70b", gpu="H100", gpus=n, micro_batch=mb,
                  grad_accum=ga, global_batch=gb, ac="full", tokens_per_s=tps, mfu=mfu,
                  **FOUNDRY)
        for n, mb, ga, gb, tps, mfu in (
            (512, 8, 1, 4096, 1007, 0.4125), (256, 8, 1, 2048, 1035, 0.4242),
            (128, 8, 1, 1024, 1058, 0.4336), (64, 8, 4, 2048, 1039, 0.4257),
            (32, 2, 16, 1024, 882, 0.3615),
        )
    ),
    *(
        Published(key=f"mpt-7b-h100x{n}", model="mpt-7b", gpu="H100", gpus=n, micro_batch=6,
                  grad_accum=1, global_batch=gb, ac="none", tokens_per_s=tps, mfu=mfu,
                  **FOUNDRY)
        for n, gb, tps, mfu in (
            (512, 3072, 9670, 0.422), (256, 1536, 10119, 0.4415), (128, 768, 10475, 0.4571),
            (8, 48, 10643, 0.4644),
        )
    ),
    Published(key="mpt-7b-a100x8", model="mpt-7b", gpu="A100-SXM-80GB", gpus=8,
              micro_batch=6, grad_accum=2, global_batch=96, ac="none", tokens_per_s=4641,
              mfu=0.6423, **FOUNDRY),
    Published(key="mpt-70b-a100x64-pure", model="mpt-70b", gpu="A100-SXM-80GB", gpus=64,
              node_gbit_s=1600, precision="bf16-pure", micro_batch=8, grad_accum=4,
              global_batch=2048, ac="full", tokens_per_s=410, mfu=0.5333, **FOUNDRY,
              note="Precision 'bf16', MP Mode 'PURE' in the table"),
    # --- OLMo-core, Llama 3 8B shape (OLMo tokenizer), H100, GPU count not published.
    Published(key="olmo-l3-8b-h100", model="olmo-llama3-8b", gpu="H100", gpus=None,
              parallel="FSDP", seq_len=4096, micro_batch=2, global_batch=1024, ac="none",
              compile=True, tokens_per_s=9500, source=OLMO,
              note="the script later moved to HSDP; the row was not re-measured"),
    # --- Megatron-Bridge (NeMo 25.11), float8 current scaling only on H100.
    Published(key="mb-l3-8b-h100x8-fp8", model="llama3-8b", gpu="H100", gpus=8,
              parallel="FSDP (table: FSDP 1)", precision="float8", seq_len=8192, micro_batch=1,
              global_batch=128, grad_accum=16, ac="unknown", compile=False, tokens_per_s=14451,
              source=MBRIDGE, note="744 model TFLOP/s/GPU"),
    Published(key="mb-l3-70b-h100x64-tp4pp8-fp8", model="llama3-70b", gpu="H100", gpus=64,
              parallel="TP 4 x PP 8 (VP 5), DDP", tp=4, pp=8, precision="float8",
              seq_len=8192, micro_batch=1, global_batch=128, grad_accum=64, ac="unknown",
              compile=False, tokens_per_s=1602, source=MBRIDGE, note="719 model TFLOP/s/GPU"),
)
# fmt: on
