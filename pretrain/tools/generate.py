"""`pretrain generate`: sampling from a checkpoint with a KV cache.

Decoding runs the model's own forward, the one training runs: `Transformer.set_kv_cache`
gives each attention layer a preallocated cache of the keys and values of earlier
positions, so each new token costs one position's work, and `forward(..., start_pos=n)`
offsets positions and masks. Nothing of attention is written here; a test checks the
logits of every cached step against a full forward.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pretrain.config.schema import Config
from pretrain.errors import ConfigError
from pretrain.model.transformer import Transformer


def load_model(path: str | Path, device: str = "cpu") -> tuple[Transformer, Config]:
    """The model of a checkpoint (or of a run directory's latest), whole, in eval mode."""
    from pretrain.rundir import checkpoint_config, resolve_checkpoint
    from pretrain.tools.consolidate import load_tensor, model_tensors

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
    room = model.cfg.max_seq_len - len(prompt)
    steps = min(max_new_tokens, room)
    # The last sampled token is never fed back, so len(prompt) + steps - 1 positions suffice.
    model.set_kv_cache(batch_size=1, max_len=len(prompt) + max(steps - 1, 0))
    try:
        logits = model(torch.tensor([prompt], device=device))[:, -1]
        out: list[int] = []
        for _ in range(steps):
            token = sample(logits, temperature, top_k, top_p, generator)
            out.append(int(token))
            if (eos_id is not None and out[-1] == eos_id) or len(out) == steps:
                break
            logits = model(token[:, None], start_pos=len(prompt) + len(out) - 1)[:, -1]
        return out
    finally:
        model.clear_kv_cache()


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
    from pretrain.rundir import find_tokenizer, resolve_checkpoint

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
