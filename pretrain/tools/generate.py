"""`pretrain generate`: sampling from a checkpoint with a KV cache.

The cached forward reuses the model's own modules (embeddings, norms, projections, MLPs)
and only changes attention: keys and values of earlier positions are kept per layer, so
each new token costs one position's work. Positions (RoPE, ALiBi, learned), GQA and the
sliding window behave exactly as in `Transformer.forward`; a test checks the logits of
every cached step against a full forward.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pretrain.config.schema import Config
from pretrain.errors import ConfigError
from pretrain.model.attention import build_attention_bias, sdpa_attention
from pretrain.model.positions import apply_rope
from pretrain.model.transformer import Transformer


def load_model(path: str | Path, device: str = "cpu") -> tuple[Transformer, Config]:
    """The model of a checkpoint (or of a run directory's latest), whole, in eval mode."""
    from pretrain.tools.consolidate import load_tensor, model_tensors
    from pretrain.tools.export import checkpoint_config, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    cfg = checkpoint_config(checkpoint)
    with torch.device(device):
        model = Transformer(cfg.model)
    state = {name: load_tensor(checkpoint, name, meta) for name, meta in model_tensors(checkpoint).items()}  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    if cfg.model.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ConfigError(f"{checkpoint}: does not match its config (missing {missing[:3]})")
    return model.eval(), cfg


class KVCache:
    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, K, T_new, D): returns all keys and values so far."""
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


@torch.no_grad()
def forward_cached(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, T, vocab) of `tokens` (B, T), which follow the `cache.length` cached ones."""
    cfg = model.cfg
    B, T = tokens.shape
    start, end = cache.length, cache.length + T
    if end > cfg.max_seq_len:
        raise ValueError(f"{end} positions exceed model.max_seq_len {cfg.max_seq_len}")
    positions = torch.arange(start, end, device=tokens.device)
    x = model.tok_emb(tokens)
    if model.pos_emb is not None:
        x = x + model.pos_emb(positions)
    rope = (
        (model.rope_cos[start:end], model.rope_sin[start:end]) if cfg.position == "rope" else None
    )
    H, K, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    alibi = cfg.position == "alibi"
    # Only the new queries' rows against every key so far: (1, H or 1, T, end), built per
    # call (one row per decoded token) instead of a cached (end, end) mask per length.
    # Without ALiBi or a window, the first chunk is plainly causal and one new token sees
    # every key: no mask at all, so SDPA keeps its fused kernels.
    plain = not alibi and cfg.sliding_window is None and (start == 0 or T == 1)
    mask = None
    if not plain:
        mask = build_attention_bias(H, alibi, cfg.sliding_window, start, T, end, x.device, x.dtype)
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        qkv = attn.qkv(layer.attn_norm(x)).view(B, T, H + 2 * K, D)
        if rope is None:
            q, k, v = qkv.split([H, K, K], dim=2)
        else:
            qk, v = qkv.split([H + K, K], dim=2)
            q, k = apply_rope(qk, *rope).split([H, K], dim=2)
        k, v = cache.append(i, k.transpose(1, 2), v.transpose(1, 2))  # (B, K, end, D)
        y = sdpa_attention(q.transpose(1, 2), k, v, mask, causal=start == 0)  # (B, H, T, D)
        x = x + attn.out_proj(y.transpose(1, 2).reshape(B, T, H * D))
        x = x + layer.mlp(layer.mlp_norm(x))
    cache.length = end
    return model.lm_head(model.norm(x)).float()


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, vocab): greedy at temperature 0, else top-k and
    nucleus (top-p) filtering of the tempered distribution."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keeps the first always
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """New token ids after `prompt` (stopping after `eos_id`, or at model.max_seq_len)."""
    device = model.tok_emb.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model.cfg.n_layers)
    room = model.cfg.max_seq_len - len(prompt)
    logits = forward_cached(model, torch.tensor([prompt], device=device), cache)[:, -1]
    out: list[int] = []
    for _ in range(min(max_new_tokens, room)):
        token = sample(logits, temperature, top_k, top_p, generator)
        out.append(int(token))
        if (eos_id is not None and out[-1] == eos_id) or len(out) == room:
            break
        logits = forward_cached(model, token[:, None], cache)[:, -1]
    return out


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="pretrain generate")
    parser.add_argument("path", help="a run directory (its latest checkpoint) or a checkpoint")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="default: the run's data.tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.tools.export import find_tokenizer, resolve_checkpoint

    model, cfg = load_model(args.path, args.device)
    tok = Tokenizer(
        find_tokenizer(args.tokenizer or cfg.data.tokenizer, resolve_checkpoint(args.path))
    )
    prompt = tok.encode(args.prompt)
    if not prompt or len(prompt) >= cfg.model.max_seq_len:
        raise ConfigError(
            f"--prompt is {len(prompt)} tokens; it must be 1 to {cfg.model.max_seq_len - 1}"
        )
    start = time.perf_counter()
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                   args.top_p, args.seed, tok.eos_id)  # fmt: skip
    seconds = time.perf_counter() - start
    print(args.prompt + tok.decode(new))
    print(
        f"{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tokens/s)", file=sys.stderr
    )
    return 0
