"""`pretrain export CHECKPOINT --hf OUT_DIR`: a Hugging Face transformers model folder.

Our decoder with RoPE, RMSNorm and SwiGLU is Llama's architecture (`LlamaForCausalLM`; with
`model.sliding_window`, Mistral's): GQA maps to `num_key_value_heads`, `model.bias` to
`attention_bias`/`mlp_bias`, `rope_scale` to linear RoPE scaling, tied embeddings to
`tie_word_embeddings`. Our RoPE already uses the "rotate half" layout of transformers'
Llama, so q/k rows need no permutation, and our `q_proj`, `k_proj`, `v_proj` are its own
(a checkpoint of the earlier fused `qkv` projection has its rows split into them). Weights
are read from the (possibly sharded) checkpoint one tensor at a time and written as
safetensors shards with an index, so the whole model is never in memory. The sentencepiece
model goes along as `tokenizer.model` with a `LlamaTokenizer` config. What transformers
cannot represent (ALiBi, learned positions, LayerNorm, GELU MLPs) is refused with the
reason. A mixture-of-experts model (model.moe) exports as the transformers MoE decoder
that routes as it does (Mixtral, Qwen2-MoE, Ernie 4.5 MoE or GLM-4.5 MoE), with this
attention and embedding mapping; export_moe.py says which and why.
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from pathlib import Path

import torch

from pretrain.errors import ConfigError
from pretrain.files import write_json
from pretrain.model.attention import QKV_NAMES, split_qkv
from pretrain.model.config import ModelConfig
from pretrain.rundir import checkpoint_config, find_tokenizer, resolve_checkpoint
from pretrain.tools.consolidate import Entry, load_tensor, model_tensors, write_safetensors
from pretrain.tools.export_moe import (
    SWIGLU_NAMES,
    expert_bias_used,
    moe_arch,
    moe_config,
    moe_entries,
    qk_rows,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(
    m: ModelConfig,
    dtype: torch.dtype,
    bos_id: int,
    eos_id: int,
    pad_id: int = -1,
    expert_bias: bool | None = None,
) -> dict:
    """config.json; with model.moe, of the MoE decoder that routes as ours (export_moe.py;
    `expert_bias`: whether routing uses the expert bias, None: as model.moe.balance says)."""
    unsupported = {
        "alibi": m.position == "alibi",
        "learned": m.position == "learned",
        "layernorm": m.norm == "layernorm",
        "gelu": m.mlp == "gelu",
        "window_bias": bool(m.sliding_window) and m.bias,
    }
    why = {
        "alibi": "model.position=alibi: no transformers decoder pairs ALiBi with this "
        "pre-norm RMSNorm/SwiGLU block (BLOOM and MPT use other layouts)",
        "learned": "model.position=learned: Llama-family models only take rotary positions",
        "layernorm": "model.norm=layernorm: transformers' Llama/Mistral use RMSNorm",
        "gelu": "model.mlp=gelu: transformers' Llama/Mistral use a SwiGLU MLP",
        "window_bias": "model.sliding_window with model.bias=true: transformers' Mistral "
        "(the sliding-window Llama) has no biases",
    }
    for key, bad in unsupported.items():
        if bad:
            raise ConfigError(f"cannot export to transformers: {why[key]}")
    config = {
        "architectures": ["MistralForCausalLM" if m.sliding_window else "LlamaForCausalLM"],
        "model_type": "mistral" if m.sliding_window else "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.hidden_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None
        if m.rope_scale == 1.0
        else {"rope_type": "linear", "factor": m.rope_scale},
        "attention_bias": m.bias,
        "mlp_bias": m.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": HF_DTYPE_NAMES[dtype],  # read by transformers 4.45 to 5.x
        "use_cache": True,
    }
    if pad_id >= 0:
        config["pad_token_id"] = pad_id
    if m.sliding_window:
        config["sliding_window"] = m.sliding_window
    if m.moe.enabled:
        return moe_config(m, moe_arch(m, expert_bias), config)
    return config


def hf_entries(
    checkpoint: Path, m: ModelConfig, dtype: torch.dtype, expert_bias: bool | None = None
) -> list[Entry]:
    """Our tensors, renamed to transformers' names, in layer order (the rows of a fused
    `qkv` of the earlier layout split into q_proj, k_proj and v_proj; MoE blocks as
    export_moe.py maps them)."""
    tensors = model_tensors(checkpoint)
    load = lru_cache(maxsize=1)(lambda name: load_tensor(checkpoint, name, tensors[name]))
    arch = moe_arch(m, expert_bias) if m.moe.enabled else None

    def entry(hf_name: str, ours: str, transform=None, as_dtype=None) -> Entry:
        """`ours` as `hf_name`, through `transform` (tensor -> tensor, shapes on the meta
        device too), in `as_dtype` (default: the export's)."""
        if ours not in tensors:
            raise ConfigError(
                f"{checkpoint}: no tensor {ours}; is this checkpoint from this model?"
            )

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if transform is None else transform(t)

        shape = list(pick(torch.empty(tensors[ours].size, device="meta")).shape)
        return Entry(hf_name, shape, as_dtype or dtype, lambda: pick(load(ours)))

    def zeros(hf_name: str, shape: list[int]) -> Entry:
        return Entry(hf_name, shape, dtype, lambda: torch.zeros(shape))

    def qkv_part(part: int, then=None):
        """Part `part` (0 q, 1 k, 2 v) of a fused qkv, then `then`."""

        def split(t: torch.Tensor) -> torch.Tensor:
            t = split_qkv(t, m.n_heads, m.kv_heads, m.head_dim)[part]
            return t if then is None else then(t)

        return split

    rope_rows = qk_rows(m, arch)  # q/k rows into the export's RoPE layout (None: as ours)
    out = [entry("model.embed_tokens.weight", "tok_emb.weight")]
    for i in range(m.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        names = [("input_layernorm.weight", "attn_norm.weight")]
        names += [("post_attention_layernorm.weight", "mlp_norm.weight")]
        moe = m.moe.is_moe_layer(i)
        for kind in ("weight", "bias") if m.bias else ("weight",):
            fused = f"{ours}attn.qkv.{kind}"  # a checkpoint of the earlier fused layout
            for part, proj in enumerate(QKV_NAMES):
                name = f"{hf}self_attn.{proj}.{kind}"
                rows = rope_rows if proj != "v_proj" else None
                if fused in tensors:
                    out.append(entry(name, fused, qkv_part(part, rows)))
                else:
                    out.append(entry(name, f"{ours}attn.{proj}.{kind}", rows))
            names += [(f"self_attn.o_proj.{kind}", f"attn.out_proj.{kind}")]
            if not moe:
                names += [(f"mlp.{theirs}.{kind}", f"mlp.{w}.{kind}") for w, theirs in SWIGLU_NAMES.items()]  # fmt: skip
        out += [entry(hf + name, ours + src) for name, src in names]
        if moe:
            out += moe_entries(arch, m, hf, ours, entry, zeros)
    out.append(entry("model.norm.weight", "norm.weight"))
    if not m.tie_embeddings:
        out.append(entry("lm_head.weight", "lm_head.weight"))
    return out


def export_hf(
    checkpoint: str | Path,
    out_dir: Path,
    dtype: str = "fp32",
    max_shard_bytes: int = 5 * 2**30,
    tokenizer: str | Path | None = None,
    progress=None,
) -> list[Path]:
    """Write the transformers folder; returns the files written. `progress(entry)` is
    called after every tensor."""
    checkpoint = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(checkpoint)
    torch_dtype = DTYPES[dtype]
    tok_path = find_tokenizer(tokenizer or cfg.data.tokenizer, checkpoint)
    from pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer(tok_path)
    biased = (
        expert_bias_used(checkpoint, cfg.model, model_tensors(checkpoint))
        if cfg.model.moe.enabled
        else None
    )
    config = hf_config(cfg.model, torch_dtype, tok.bos_id, tok.eos_id, tok.pad_id, biased)
    entries = hf_entries(checkpoint, cfg.model, torch_dtype, biased)
    shards: list[list[Entry]] = [[]]
    for e in entries:
        if shards[-1] and sum(x.nbytes for x in shards[-1]) + e.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(e)

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(out_dir / name, shard, on_tensor=progress)
        written.append(out_dir / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.name: n for n, s in zip(names, shards, strict=True) for e in s},
        }
        written.append(_write_json(out_dir / "model.safetensors.index.json", index))
    written.append(_write_json(out_dir / "config.json", config))
    written.append(_write_json(out_dir / "generation_config.json", {
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "do_sample": True,
        **({"pad_token_id": tok.pad_id} if tok.pad_id >= 0 else {}),
    }))  # fmt: skip
    shutil.copyfile(tok_path, out_dir / "tokenizer.model")
    written.append(out_dir / "tokenizer.model")
    written.append(_write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "legacy": False, "clean_up_tokenization_spaces": False,
        # transformers 5 loads a Mistral export's tokenizer as its generic class, which
        # pads on the right; batched generation needs the left, as Llama's does.
        "padding_side": "left",
        "model_max_length": cfg.model.max_seq_len,
    }))  # fmt: skip
    return written


def _write_json(path: Path, obj: dict) -> Path:
    write_json(path, obj, indent=2)
    return path


def main(argv: list[str]) -> int:
    import argparse

    from pretrain.progress import Progress

    parser = argparse.ArgumentParser(prog="pretrain export")
    parser.add_argument("checkpoint", help="a checkpoint folder (step_N) or a run directory")
    parser.add_argument("--hf", type=Path, required=True, metavar="OUT_DIR")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors file size")
    parser.add_argument("--tokenizer", help="default: the run's data.tokenizer")
    args = parser.parse_args(argv)
    if args.hf.exists() and any(args.hf.iterdir()):
        raise ConfigError(f"--hf {args.hf}: not empty; give a new folder")
    checkpoint = resolve_checkpoint(args.checkpoint)
    total = len(model_tensors(checkpoint))
    with Progress("export", total, "tensor", interval=5.0) as progress:
        files = export_hf(
            checkpoint, args.hf, args.dtype, int(args.max_shard_gb * 2**30), args.tokenizer,
            progress=lambda e: progress.update(1, e.nbytes),
        )  # fmt: skip
    size = sum(f.stat().st_size for f in files)
    print(f"{args.hf}: {len(files)} files, {size / 1e6:,.1f} MB from {checkpoint}")
    print(f"  transformers.AutoModelForCausalLM.from_pretrained({str(args.hf)!r})")
    return 0
