"""The mixture-of-experts part of `pretrain export --hf`: which transformers MoE decoder
routes as ours does, its config, and the MoE blocks' tensors under its names.

Ours: router scores softmax or sigmoid of a linear map (fp32); each token's top_k experts
picked by score + `router.expert_bias`, weighted by their unbiased scores (divided by their
sum with norm_topk), times routed_scale; plus shared experts (one SwiGLU, optionally times
sigmoid(a gate)); blocks i >= first_dense with (i + 1) % every == 0 are MoE. What each
transformers 4.57 decoder computes (read from its modeling code), and so what goes where:

- Mixtral: softmax, top-k always renormalised, no bias, no shared expert, every block MoE.
- Qwen2-MoE: softmax, `norm_topk_prob`, no bias, a shared expert always times
  sigmoid(`shared_expert_gate`), dense blocks by `mlp_only_layers` and
  `decoder_sparse_step`. Our gated shared experts; without shared experts, it is written
  zero wide (`shared_expert_intermediate_size` 0, which adds exactly 0).
- Ernie 4.5 MoE: softmax, top-k chosen by score + `e_score_correction_bias` and always
  renormalised, ungated shared experts or none, dense blocks by `moe_layer_start_index` and
  `moe_layer_interval`. Its RoPE rotates interleaved pairs (2i, 2i+1), ours the halves
  (i, i + head_dim/2): q and k rows are permuted per head to match (scores unchanged).
- GLM-4.5 MoE (`glm4_moe`): sigmoid, top-k by score + `e_score_correction_bias`
  (n_group = topk_group = 1: no group limit), `norm_topk_prob`, `routed_scaling_factor`,
  ungated shared experts (zero wide without), the first `first_k_dense_replace` blocks dense.

Qwen3-MoE and dots1 normalise q and k per head (q_norm/k_norm, always on), which ours
does not, so nothing maps there. routed_scale where the decoder has no such factor is
folded into the routed experts' down projections (the weighted sum is linear in them).
A setting none of these can represent is refused by `moe_arch`, naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pretrain.errors import ConfigError
from pretrain.model.config import ModelConfig
from pretrain.tools.consolidate import Entry, load_tensor

ARCHS = {  # ours -> (architectures, display name)
    "mixtral": ("MixtralForCausalLM", "Mixtral"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2-MoE"),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "Ernie 4.5 MoE"),
    "glm4_moe": ("Glm4MoeForCausalLM", "GLM-4.5 MoE"),
}
BIAS_BALANCE = ("bias", "both")
SWIGLU_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # ours -> theirs

# entry(hf_name, our_name, transform=None, dtype=None): one tensor of the export, a
# transform of one of ours; zeros(hf_name, shape): one of zeros.
EntryFn = Callable[..., Entry]
ZerosFn = Callable[[str, list[int]], Entry]


def refuse(why: str) -> ConfigError:
    return ConfigError(f"cannot export to transformers: {why}")


def expert_bias_used(checkpoint: Path, m: ModelConfig, tensors: dict) -> bool:
    """Whether routing uses an expert bias: balance bias or both, or a nonzero bias left in
    the checkpoint (a run resumed with another balance keeps routing by it)."""
    if m.moe.balance in BIAS_BALANCE:
        return True
    names = [f"layers.{i}.mlp.router.expert_bias" for i in m.moe_layers()]
    return any(load_tensor(checkpoint, n, tensors[n]).any() for n in names if n in tensors)


def moe_arch(m: ModelConfig, expert_bias: bool | None = None) -> str:
    """The transformers decoder (model_type) that routes as `m` does, or a ConfigError naming
    the setting none can represent. `expert_bias`: whether routing uses the expert bias
    (None: as model.moe.balance says)."""
    e = m.moe
    biased = e.balance in BIAS_BALANCE if expert_bias is None else expert_bias
    bias_is = (
        f"model.moe.balance={e.balance}"
        if e.balance in BIAS_BALANCE
        else "a nonzero router.expert_bias in the checkpoint"
    )
    if m.bias:
        raise refuse(
            "model.bias=true with model.moe: transformers' MoE decoders have no bias on "
            "the attention output or in the experts; train with model.bias=false"
        )
    gated = e.shared_experts > 0 and e.shared_gate
    if e.score == "sigmoid":
        if gated:
            raise refuse(
                "model.moe.shared_gate=true with model.moe.score=sigmoid: GLM-4.5 MoE, the "
                "sigmoid router of transformers, has ungated shared experts; train with "
                "shared_gate=false, or score=softmax (Qwen2-MoE)"
            )
        if e.every != 1:
            raise refuse(
                f"model.moe.every={e.every} with model.moe.score=sigmoid: GLM-4.5 MoE makes "
                "every block after the first dense ones MoE; use model.moe.first_dense for "
                "dense blocks, or score=softmax (Qwen2-MoE or Ernie 4.5 take every)"
            )
        if e.experts < 2:
            raise refuse(
                f"model.moe.experts={e.experts} with model.moe.score=sigmoid: GLM-4.5 MoE's "
                "router needs at least 2 experts"
            )
        arch = "glm4_moe"
    elif gated:
        if biased:
            raise refuse(
                f"{bias_is} with model.moe.shared_gate=true: Qwen2-MoE, the only "
                "transformers MoE with a gated shared expert, has no expert bias, and "
                "dropping it would change the routing; train with balance=aux or none, or "
                "shared_gate=false (Ernie 4.5 carries the bias)"
            )
        arch = "qwen2_moe"
    elif biased or e.shared_experts:
        if not e.norm_topk:
            what = bias_is if biased else f"model.moe.shared_experts={e.shared_experts}"
            raise refuse(
                f"model.moe.norm_topk=false with {what} and model.moe.score=softmax: Ernie "
                "4.5 MoE, the transformers MoE with a softmax router and an expert bias or "
                "ungated shared experts, always renormalises the top-k weights; train with "
                "norm_topk=true" + ("" if biased else ", or shared_gate=true (Qwen2-MoE)")
            )
        arch = "ernie4_5_moe"
    elif e.norm_topk and e.first_dense == 0 and e.every == 1:
        arch = "mixtral"
    else:
        arch = "qwen2_moe"
    if m.sliding_window and arch != "mixtral":
        raise refuse(
            f"model.sliding_window={m.sliding_window} with this model.moe (it would export "
            f"as {ARCHS[arch][1]}, which has no sliding window): only Mixtral's mapping "
            "(softmax, norm_topk, no expert bias, no shared experts, every block MoE) takes one"
        )
    return arch


def moe_config(m: ModelConfig, arch: str, config: dict) -> dict:
    """The dense export's config (`config`: attention, RoPE, norms, embeddings) made the
    config of `arch`."""
    e, hidden = m.moe, m.expert_hidden
    out = {k: v for k, v in config.items() if k not in ("mlp_bias", "sliding_window")}
    out["architectures"], out["model_type"] = [ARCHS[arch][0]], arch
    if arch == "mixtral":
        out |= {"intermediate_size": hidden, "num_local_experts": e.experts,
                "num_experts_per_tok": e.top_k, "router_jitter_noise": 0.0,
                "sliding_window": m.sliding_window}  # fmt: skip
    elif arch == "qwen2_moe":
        out |= {"num_experts": e.experts, "num_experts_per_tok": e.top_k,
                "moe_intermediate_size": hidden, "norm_topk_prob": e.norm_topk,
                "shared_expert_intermediate_size": e.shared_experts * hidden,
                "decoder_sparse_step": e.every, "mlp_only_layers": list(range(e.first_dense)),
                "qkv_bias": False, "use_sliding_window": False, "sliding_window": None}  # fmt: skip
    elif arch == "ernie4_5_moe":
        out.pop("attention_bias")
        out |= {"use_bias": False, "moe_num_experts": e.experts, "moe_k": e.top_k,
                "moe_intermediate_size": hidden, "moe_num_shared_experts": e.shared_experts,
                "moe_layer_start_index": e.first_dense, "moe_layer_end_index": m.n_layers - 1,
                "moe_layer_interval": e.every, "moe_norm_min": 1e-30}  # fmt: skip
    else:  # glm4_moe
        out |= {"n_routed_experts": e.experts, "num_experts_per_tok": e.top_k,
                "moe_intermediate_size": hidden, "n_shared_experts": e.shared_experts,
                "routed_scaling_factor": e.routed_scale, "norm_topk_prob": e.norm_topk,
                "n_group": 1, "topk_group": 1, "first_k_dense_replace": e.first_dense,
                "partial_rotary_factor": 1.0, "use_qk_norm": False}  # fmt: skip
    return out


def qk_rows(m: ModelConfig, arch: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What turns our q_proj/k_proj weight rows into `arch`'s RoPE layout (None: as is).
    Ernie rotates pairs (2i, 2i+1) by frequency i, ours (i, i + head_dim/2): row 2i of
    each head is our i, row 2i+1 our i + head_dim/2."""
    if arch != "ernie4_5_moe":
        return None
    half = m.head_dim // 2
    order = torch.arange(m.head_dim).view(2, half).t().flatten()

    def permute(w: torch.Tensor) -> torch.Tensor:
        heads = w.shape[0] // m.head_dim
        return w.view(heads, m.head_dim, -1)[:, order.to(w.device)].reshape(w.shape)

    return permute


def moe_entries(
    arch: str, m: ModelConfig, hf: str, ours: str, entry: EntryFn, zeros: ZerosFn
) -> list[Entry]:
    """Block `ours` (`layers.i.`)'s MoE MLP as `arch`'s tensors under `hf` (`model.layers.i.`);
    the experts grouped by our stacked tensor, so each is read once."""
    e, d = m.moe, m.d_model
    mlp = f"{hf}block_sparse_moe." if arch == "mixtral" else f"{hf}mlp."
    src = f"{ours}mlp."
    out = [entry(f"{mlp}gate.weight", f"{src}router.weight")]
    names = {"w1": "w1", "w3": "w3", "w2": "w2"} if arch == "mixtral" else SWIGLU_NAMES
    # Fold routed_scale into the down projections where the decoder has no such factor.
    scale = 1.0 if arch == "glm4_moe" else e.routed_scale
    for ours_w, theirs in names.items():
        for i in range(e.experts):
            fold = scale if ours_w == "w2" and scale != 1.0 else None
            out.append(entry(f"{mlp}experts.{i}.{theirs}.weight", f"{src}experts.{ours_w}",
                             _expert(i, fold)))  # fmt: skip
    bias = f"{src}router.expert_bias"
    if arch == "ernie4_5_moe":
        out.append(entry(f"{mlp}moe_statics.e_score_correction_bias", bias,
                         lambda t: t.view(1, -1), torch.float32))  # fmt: skip
    elif arch == "glm4_moe":
        out.append(entry(f"{mlp}gate.e_score_correction_bias", bias, None, torch.float32))
    if arch == "mixtral":
        return out
    shared = f"{mlp}shared_expert." if arch == "qwen2_moe" else f"{mlp}shared_experts."
    if e.shared_experts:
        out += [entry(f"{shared}{theirs}.weight", f"{src}shared.{ours_w}.weight")
                for ours_w, theirs in names.items()]  # fmt: skip
    elif arch != "ernie4_5_moe":  # a zero-wide shared expert: adds exactly 0
        shapes = {"gate_proj": [0, d], "up_proj": [0, d], "down_proj": [d, 0]}
        out += [zeros(f"{shared}{name}.weight", shape) for name, shape in shapes.items()]
    if arch == "qwen2_moe":
        if e.shared_experts:
            out.append(entry(f"{mlp}shared_expert_gate.weight", f"{src}shared_gate.weight"))
        else:
            out.append(zeros(f"{mlp}shared_expert_gate.weight", [1, d]))
    return out


def _expert(i: int, scale: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Expert i of a stacked (E, in, out) weight as an nn.Linear weight (out, in)."""
    if scale is None:
        return lambda t: t[i].t()
    return lambda t: t[i].t() * scale
