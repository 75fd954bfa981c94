"""Closed-form parameter and FLOP counts, used for logging model size and for MFU.

Pure functions of the config, so they can be checked against a built model in tests and
evaluated for configs too big to build.
"""

from __future__ import annotations

from pretrain.model.config import ModelConfig


def _attn_matmul_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    return d * (cfg.n_heads + 2 * cfg.kv_heads) * hd + cfg.n_heads * hd * d  # q/k/v, out


def _mlp_matmul_params(cfg: ModelConfig, layer: int, active: bool) -> int:
    """Weights of block `layer`'s MLP matmuls: a dense MLP's, or a MoE's router, shared
    experts and routed experts (all of them, or the top_k a token uses when `active`)."""
    m, d = cfg.moe, cfg.d_model
    if not m.is_moe_layer(layer):
        return (3 if cfg.mlp == "swiglu" else 2) * d * cfg.hidden_dim
    routed = m.top_k if active else m.experts
    gate = d if m.shared_experts and m.shared_gate else 0
    return m.experts * d + gate + 3 * d * cfg.expert_hidden * (routed + m.shared_experts)


def _blocks_matmul_params(cfg: ModelConfig, active: bool = False) -> int:
    """Weights of the matrix multiplies in every block (no biases, no norms)."""
    attn = cfg.n_layers * _attn_matmul_params(cfg)
    return attn + sum(_mlp_matmul_params(cfg, i, active) for i in range(cfg.n_layers))


def _layer_bias_params(cfg: ModelConfig, layer: int) -> int:
    if not cfg.bias:
        return 0
    qkv = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
    if cfg.moe.is_moe_layer(layer):  # experts have no biases; a shared SwiGLU has
        m = cfg.moe
        mlp = (2 * m.shared_experts * cfg.expert_hidden + cfg.d_model) if m.shared_experts else 0
        return qkv + cfg.d_model + mlp
    mlp = 2 * cfg.hidden_dim if cfg.mlp == "swiglu" else cfg.hidden_dim
    return qkv + cfg.d_model + mlp + cfg.d_model  # qkv, out_proj, MLP up/gate, MLP down


def _norm_params(cfg: ModelConfig) -> int:
    # RMSNorm: weight only. LayerNorm: weight, plus a bias when cfg.bias.
    has_bias = cfg.norm == "layernorm" and cfg.bias
    return cfg.d_model * (2 if has_bias else 1)


def count_params(cfg: ModelConfig, include_embeddings: bool = True, active: bool = False) -> int:
    """Number of distinct parameters of `Transformer(cfg)` (a tied LM head counts once).

    include_embeddings=False leaves out the lookup tables (tok_emb, and pos_emb when
    position='learned'), i.e. counts exactly the parameters outside nn.Embedding modules. A
    tied LM head is the token table, so it is left out too; an untied one is counted.
    active=True counts, of each MoE layer's routed experts, only the top_k one token uses.
    """
    biases = sum(_layer_bias_params(cfg, i) for i in range(cfg.n_layers))
    total = _blocks_matmul_params(cfg, active) + biases
    total += (2 * cfg.n_layers + 1) * _norm_params(cfg)  # two per block + the final norm
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * cfg.d_model  # lm_head, never has a bias
    if include_embeddings:
        total += cfg.vocab_size * cfg.d_model
        if cfg.position == "learned":
            total += cfg.max_seq_len * cfg.d_model
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len.

        6 * N + 12 * n_layers * d_model * S

    N is the number of weights in matrix multiplies: q/k/v and output projections, the MLP
    and the LM head (counted even when tied, since it is still a matmul); embedding lookups,
    norms and biases are left out. 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward).
    Of a MoE layer's routed experts only the top_k a token goes through count (active
    parameters), with its router and shared experts. The second term is attention itself (QK^T and PV: 2 matmuls x 2 FLOPs x 3 passes x
    d_model per key), with S keys per query as in PaLM (Chowdhery et al. 2022, appendix B),
    i.e. the causal half is not discounted. With a sliding window a query sees at most
    `sliding_window` keys, so S = min(seq_len, sliding_window).
    """
    n_matmul = _blocks_matmul_params(cfg, active=True) + cfg.vocab_size * cfg.d_model
    keys = seq_len if cfg.sliding_window is None else min(seq_len, cfg.sliding_window)
    return float(6 * n_matmul + 12 * cfg.n_layers * cfg.d_model * keys)
