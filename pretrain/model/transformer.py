"""The decoder-only transformer: embeddings, pre-norm blocks, final norm, LM head.

Design choices, all driven by ModelConfig:
- pre-norm residual blocks: x + attn(norm(x)), then x + mlp(norm(x));
- positions: RoPE (cos/sin cache shared by all layers), ALiBi (inside attention) or a
  learned absolute table `pos_emb`;
- MLP: SwiGLU (w1 gate, w3 up, w2 down) or GELU (fc, proj), or in the blocks model.moe
  names a mixture of experts (moe.py); norm: RMSNorm or LayerNorm;
- `lm_head` (an `OutputHead`: the output projection and the loss, one module) shares its
  weight with `tok_emb` when tie_embeddings;
- `forward(tokens, targets)` returns the loss, computed in chunks of tokens inside the
  head (`loss.py`), so the full fp32 logits never exist during training;
- generation runs the same forward: `set_kv_cache` gives every attention layer a
  preallocated cache and `forward(tokens, start_pos=...)` feeds the tokens that follow the
  first `start_pos` ones (positions, RoPE and masks offset to match).

Initialisation lives in `init_weights`, not in the constructors, so a model can be built on
the meta device, materialised with `to_empty(device=...)` and then initialised in place. The
constructor itself builds on meta and materialises, so both routes draw the same random
numbers in the same order: same seed, same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from pretrain.model.attention import Attention
from pretrain.model.config import CHOICES, ModelConfig
from pretrain.model.kv_cache import KVCache
from pretrain.model.loss import OutputHead
from pretrain.model.mlp import GeluMLP, SwiGLU
from pretrain.model.moe import GroupedExperts, MoE, MoEStep, Router
from pretrain.model.positions import rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm"):  # fused kernel, torch >= 2.4
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


class LayerNorm(nn.Module):
    """LayerNorm whose bias is optional, so `bias: false` removes every bias in the model."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


NORM_CLASSES = (RMSNorm, LayerNorm)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        if cfg.moe.is_moe_layer(index):
            self.mlp = MoE(cfg)
        else:
            self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)
        self.dropout = _dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, start_pos))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def check_config(cfg: ModelConfig) -> None:
    """Raise ValueError for a config the model cannot be built from."""
    for name, allowed in CHOICES.items():
        section, _, key = name.rpartition(".")
        value = getattr(cfg.moe if section else cfg, key)
        if value not in allowed:
            raise ValueError(f"model.{name} must be one of {allowed} (got {value!r})")
    m = cfg.moe
    if m.enabled and not 1 <= m.top_k <= m.experts:
        raise ValueError(f"model.moe.top_k must be in 1..moe.experts={m.experts} (got {m.top_k})")
    if m.enabled and cfg.mlp != "swiglu":
        raise ValueError("model.moe needs model.mlp=swiglu: its experts are SwiGLUs")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
    if cfg.position == "rope" and cfg.head_dim % 2:
        raise ValueError(f"rope needs an even head_dim (got {cfg.head_dim})")
    if cfg.sliding_window is not None and cfg.sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None (got {cfg.sliding_window})")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        # Honours `with torch.device(...)` and torch.set_default_device.
        device = torch.empty(0).device
        with torch.device("meta"):  # no memory, no RNG draws until init_weights
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = (
                nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
            )
            self.emb_dropout = _dropout(cfg.dropout)
            # Keyed by name ("0", "1", ...: the same parameter names as a list): a pipeline
            # stage that drops the layers it does not run renames none of the others.
            self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
            self.norm = make_norm(cfg)
            self.lm_head = OutputHead(cfg.d_model, cfg.vocab_size)
            if cfg.position == "rope":
                # Derived from the config, so not saved in checkpoints; init_weights fills them.
                half = cfg.head_dim // 2
                self.register_buffer(
                    "rope_cos", torch.empty(cfg.max_seq_len, half), persistent=False
                )
                self.register_buffer(
                    "rope_sin", torch.empty(cfg.max_seq_len, half), persistent=False
                )
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in place; deterministic under a seed.

        Linear and embedding weights ~ N(0, init_std); the projections that write into the
        residual stream (attention out_proj, MLP down projection) use init_std / sqrt(2 *
        n_layers) so the residual variance does not grow with depth (GPT-2). Biases are zero
        and norm weights one.
        """
        cfg = self.cfg
        if cfg.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight  # to_empty() unties shared parameters
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        residual_out = set()  # the modules that write into the residual stream
        for b in self.layers.values():
            outs = b.mlp.out_projs if isinstance(b.mlp, MoE) else [b.mlp.out_proj]
            residual_out.update(id(m) for m in [b.attn.out_proj, *outs])
        for module in self.modules():
            if isinstance(module, OutputHead):
                if not cfg.tie_embeddings:  # else the weight is tok_emb's, initialised as one
                    _normal_(module.weight, cfg.init_std)
            elif isinstance(module, nn.Linear):
                std = residual_std if id(module) in residual_out else cfg.init_std
                _normal_(module.weight, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Router):  # each module's own parameters: ZeRO-3's
                _normal_(module.weight, cfg.init_std)  # build materialises one at a time
                module.expert_bias.zero_()
            elif isinstance(module, GroupedExperts):  # w2 (down) writes into the residual
                for w in (module.w1, module.w3, module.w2):
                    _normal_(w, residual_std if w is module.w2 else cfg.init_std)
            elif isinstance(module, nn.Embedding):
                _normal_(module.weight, cfg.init_std)
            elif isinstance(module, NORM_CLASSES):
                module.reset_parameters()
        if cfg.position == "rope":
            cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scale)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        loss_chunk_tokens: int = 0,
        start_pos: int = 0,
        scores: bool = False,
        planned_tokens: int = 0,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab_size) in float32.

        With targets (B, T) int64: the mean cross-entropy instead (a float32 scalar), from
        logits of at most `loss_chunk_tokens` tokens at a time (0: all at once), never kept
        for backward (see `chunked_cross_entropy`). The loss is taken here, not by the
        caller, so a sharded wrapper has the output projection gathered while it runs.

        scores=True (evaluation, see `token_scores`): with targets < 0 where nothing is
        scored, the (N, 2) log-probability and greedy flag of each scored target instead;
        the head is called as often as `planned_tokens` scored tokens need (the most any
        rank scores in this forward), so sharded ranks gather its weight alike.

        start_pos (only with a KV cache, see `set_kv_cache`): the tokens sit at positions
        start_pos.. and attend over the cached keys and values of every earlier position.

        positions (T,) int64: the position each token's encoding (RoPE, a learned table)
        is taken at; default start_pos..start_pos+T-1. The caller that splits a sequence
        (context parallelism) passes each part's own. Attention stays causal over the
        order the tokens are given in, and ALiBi's distances are counted in that order.
        """
        x = self.hidden(tokens, start_pos, positions)  # (B, T, d_model)
        aux = self._moe_collect()
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab_size) fp32
        if targets.shape != tokens.shape:
            raise ValueError(
                f"targets {tuple(targets.shape)} must match tokens {tuple(tokens.shape)}"
            )
        loss = self.lm_head(
            x.flatten(0, 1),
            targets.flatten(),
            chunk_tokens=loss_chunk_tokens,
            scores=scores,
            planned_tokens=planned_tokens,
        )
        if aux is not None and not scores:
            # The experts' balance and z losses add their gradients, not their values: the
            # loss reported is the cross-entropy itself (aux - aux.detach() is exactly 0).
            loss = loss + (aux - aux.detach())
        return loss

    def hidden(
        self, tokens: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, T) at `positions` (default start_pos..) -> the final norm's output
        (B, T, d_model), the LM head's input."""
        end = start_pos + tokens.shape[1]
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {end} exceeds model.max_seq_len {self.cfg.max_seq_len}"
            )
        if start_pos and not self.kv_caches():  # each layer's cache checks the rest
            raise ValueError(f"start_pos {start_pos} needs a KV cache (set_kv_cache)")
        if positions is not None and positions.shape != tokens.shape[1:]:
            raise ValueError(
                f"positions {tuple(positions.shape)} must be ({tokens.shape[1]},): one per token"
            )
        x = self.tok_emb(tokens)  # (B, T, d_model)
        if self.pos_emb is not None:
            at = (
                torch.arange(start_pos, end, device=tokens.device)
                if positions is None
                else positions
            )
            x = x + self.pos_emb(at)  # (T, d_model) broadcasts over the batch
        x = self.emb_dropout(x)
        rope = None
        if self.cfg.position == "rope" and positions is None:
            rope = (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end])  # (T, D/2) each
        elif self.cfg.position == "rope":
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        for layer in self.layers.values():
            x = layer(x, rope, start_pos)
        return self.norm(x)

    def moe_layers(self) -> list[MoE]:
        """Every MoE MLP, in block order, found through any wrapper."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def _moe_collect(self) -> torch.Tensor | None:
        """After a forward: the sum of the MoE layers' weighted auxiliary losses (None: none
        to add), and, in a training forward, their routing added to the step's statistics
        (`take_moe_step`). Collected here, outside any checkpointed block, so a block
        recomputed in backward is not counted twice."""
        layers = self.moe_layers()
        if not layers:
            return None
        train = self.training and torch.is_grad_enabled()
        if train:
            if self._moe_step is None:
                self._moe_step = MoEStep()
            self._moe_step.add(layers)
        aux = None
        for m in layers:
            if m.aux_loss is not None and train:
                aux = m.aux_loss if aux is None else aux + m.aux_loss
            m.aux_loss = m.last = None
        return aux

    _moe_step: MoEStep | None = None

    def take_moe_step(self) -> MoEStep | None:
        """The routing statistics of the training forwards since the last call (None: no
        MoE layer, or no forward), and a fresh start."""
        step, self._moe_step = self._moe_step, None
        return step

    def attentions(self) -> list[Attention]:
        """Every attention module, found through any activation-checkpointing wrapper."""
        return [m for m in self.modules() if isinstance(m, Attention)]

    def kv_caches(self) -> list[KVCache]:
        return [a.kv_cache for a in self.attentions() if a.kv_cache is not None]

    def set_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Give every attention layer an empty KV cache of `batch_size` rows and `max_len`
        positions (default model.max_seq_len), on the device and in the dtype of the weights
        unless given; forward then stores each call's keys and values (see `start_pos`)."""
        cfg = self.cfg
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(
                f"KV cache max_len {max_len} must be 1..model.max_seq_len {cfg.max_seq_len}"
            )
        weight = self.tok_emb.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        for attn in self.attentions():
            attn.kv_cache = KVCache(batch_size, max_len, cfg.kv_heads, cfg.head_dim, device, dtype)

    def clear_kv_cache(self) -> None:
        """Drop every layer's KV cache (and its memory): forward is training's again."""
        for attn in self.attentions():
            attn.kv_cache = None


@torch.no_grad()
def _normal_(param: torch.Tensor, std: float) -> None:
    """N(0, std) init that gives the same values whether `param` is whole or a shard.

    The full tensor is drawn (one parameter at a time, never the whole model) in the same
    RNG order on every rank; a sharded parameter (an FSDP2 DTensor) keeps its own slice,
    so a sharded model starts bit-identical to a single-process one.
    """
    full = torch.empty(param.shape, dtype=param.dtype, device=param.device).normal_(0.0, std)
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)
