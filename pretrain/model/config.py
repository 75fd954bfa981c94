"""The model's own arguments.

`pretrain.model` imports nothing from the rest of the package, so its hyperparameters live
here as a plain dataclass. `pretrain.config` uses this class as the `model:` section of the
run config and validates it there, where errors can name the config key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POSITIONS = ("rope", "alibi", "learned")
MLPS = ("swiglu", "gelu")
NORMS = ("rmsnorm", "layernorm")
ATTENTION_IMPLS = ("auto", "sdpa", "flash", "naive")
MOE_SCORES = ("softmax", "sigmoid")
MOE_BALANCE = ("bias", "aux", "both", "none")
MOE_GROUPED_MM = ("auto", "grouped", "loop")
# The model's keys with a fixed set of values (relative to model.), checked by the model
# and by the config loader.
CHOICES = {
    "position": POSITIONS,
    "mlp": MLPS,
    "norm": NORMS,
    "attention": ATTENTION_IMPLS,
    "moe.score": MOE_SCORES,
    "moe.balance": MOE_BALANCE,
    "moe.grouped_mm": MOE_GROUPED_MM,
}


@dataclass
class MoEConfig:
    # Routed experts per MoE layer; 0: a dense model (every block has the plain MLP).
    experts: int = 0
    # Experts each token is sent to (top-k over the router's scores).
    top_k: int = 2
    # Shared experts every token goes through besides its routed ones (DeepSeek, Qwen2-MoE);
    # they are one SwiGLU of shared_experts x expert_hidden.
    shared_experts: int = 0
    # Hidden width of each expert's SwiGLU; None: the model's MLP width (mlp_hidden).
    expert_hidden: int | None = None
    # Blocks 0..first_dense-1 keep the dense MLP (DeepSeek's first_k_dense_replace).
    first_dense: int = 0
    # Of the rest, block i is MoE when (i + 1) % every == 0 (Qwen's decoder_sparse_step).
    every: int = 1
    # Router scores from its logits: softmax (Mixtral, Qwen) or sigmoid (DeepSeek-V3, GLM-4.5).
    score: str = "softmax"
    # Divide each token's top-k scores by their sum (Mixtral always does; Qwen3 and
    # DeepSeek-V3 by a flag).
    norm_topk: bool = True
    # The routed experts' weighted sum is multiplied by this (DeepSeek's routed_scaling_factor).
    routed_scale: float = 1.0
    # Multiply the shared experts' output by sigmoid(a learned gate of the token) (Qwen2-MoE).
    shared_gate: bool = False
    # Load balancing: bias (auxiliary-loss-free: a per-expert bias added to the scores for
    # choosing experts only, moved towards balance after each step from the token counts of
    # every data-parallel rank; DeepSeek-V3), aux (a load-balancing loss), both, or none.
    balance: str = "bias"
    # How far each step moves an expert's bias (towards balance, by the sign of its load's
    # distance from the mean).
    bias_update_rate: float = 0.001
    # Weight of the auxiliary load-balancing loss (balance aux or both): E x sum over
    # experts of (share of tokens) x (mean router probability), 1 when balanced.
    aux_loss_coef: float = 0.01
    # Weight of the router z-loss (mean squared log-sum-exp of the router logits); 0: off.
    z_loss_coef: float = 0.0
    # Expert matmuls: grouped (torch._grouped_mm, one kernel for all experts), loop (one
    # matmul per expert), or auto (grouped where it runs on the device and dtype, probed at
    # the first forward and logged).
    grouped_mm: str = "auto"

    @property
    def enabled(self) -> bool:
        return self.experts > 0

    def is_moe_layer(self, i: int) -> bool:
        return self.enabled and i >= self.first_dense and (i + 1) % self.every == 0


@dataclass
class ModelConfig:
    # Token embedding rows and output logits; must equal the tokenizer's vocabulary
    # (larger only with data.allow_vocab_padding).
    vocab_size: int = 4096
    # Width of the residual stream (the embedding size).
    d_model: int = 256
    # Number of transformer blocks.
    n_layers: int = 4
    # Attention (query) heads; must divide d_model (head dim = d_model / n_heads).
    n_heads: int = 4
    # Key/value heads for grouped-query attention; None means n_heads (plain MHA), 1 is MQA.
    n_kv_heads: int | None = None
    # Longest sequence the model supports; sizes the learned position table and RoPE cache.
    max_seq_len: int = 256
    # Position encoding: rotary (rope), ALiBi attention biases, or a learned absolute table.
    position: str = "rope"
    # RoPE base: dim pair i of each head turns rope_theta^(-2i / head_dim) radians per position.
    rope_theta: float = 10000.0
    # Linear position interpolation: positions are divided by this factor (>= 1) so a model
    # trained at length L can run at scale * L.
    rope_scale: float = 1.0
    # MLP type: SwiGLU (gated, three matrices) or GELU (two matrices).
    mlp: str = "swiglu"
    # Hidden width of the MLP; None means 4 * d_model for gelu and 8/3 * d_model rounded up to
    # mlp_multiple_of for swiglu (same parameter count as a 4x gelu MLP).
    mlp_hidden: int | None = None
    # swiglu's default hidden width (mlp_hidden None) is rounded up to a multiple of this.
    mlp_multiple_of: int = 64
    # Normalisation in each pre-norm block and before the LM head.
    norm: str = "rmsnorm"
    # Epsilon added to the mean square / variance in the norms.
    norm_eps: float = 1e-5
    # Share one weight matrix between the token embedding and the LM head.
    tie_embeddings: bool = True
    # Each token attends to at most this many previous tokens (itself included); None = all.
    sliding_window: int | None = None
    # Dropout probability on the embeddings, attention weights and both residual branches
    # (training only); 0 disables.
    dropout: float = 0.0
    # Biases in the linear layers and LayerNorms (the LM head never has one).
    bias: bool = False
    # Std of the normal init of linear and embedding weights; residual output projections
    # use init_std / sqrt(2 * n_layers).
    init_std: float = 0.02
    # auto: flash_attn where it runs (importable, a CUDA GPU of compute capability >= 8.0,
    # fp16/bf16 tensors, head_dim <= 256), else PyTorch SDPA.
    attention: str = "auto"
    # Mixture of experts (model/moe.py): which blocks swap their MLP for routed experts.
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.d_model
        hidden = int(8 * self.d_model / 3)
        m = self.mlp_multiple_of
        return m * ((hidden + m - 1) // m)

    @property
    def expert_hidden(self) -> int:
        return self.moe.expert_hidden or self.hidden_dim

    def moe_layers(self) -> list[int]:
        """The blocks whose MLP is a mixture of experts."""
        return [i for i in range(self.n_layers) if self.moe.is_moe_layer(i)]
