"""DeepSeek-V3 / V2 / Kimi K2 (K2.5's language model): MLA attention + DeepSeekMoE.

What differs from the shared shell (decoder.py): MLA over a latent cache, the noaux_tc and
group_limited_greedy routers, shared experts, dense first layers.

Legend: T tokens, D hidden, V vocab, H heads, N qk_nope_head_dim, R qk_rope_head_dim,
Dv v_head_dim, C kv_lora_rank, E routed experts, K experts per token, G expert groups,
S cache slots (num_blocks * block_size), B blocks per request.

Attention runs in the absorbed (MQA) form for prefill and decode alike, so a step is one shape of
program whatever mix of prefill and decode tokens it holds:
  cache entry per token = [kv_a_layernorm(c_kv) (C) | rope(k_pe) (R)]
  q_abs = q_nope . W_UK  ->  latent_attention([q_abs | q_pe], cache)  ->  o_lat (C)  . W_UV -> o_proj
RoPE dims are interleaved (rotation acts on pairs (x[2i], x[2i+1])); yarn scaling as DeepSeek's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbo_compiler.models.attention import rope_inv_freq, rope_type, yarn_mscale
from tbo_compiler.models.decoder import DecoderModel
from tbo_compiler.models.moe import MoEBlock, ParallelConfig, RMSNorm, SwiGLU, swiglu_checkpoint_names

ops = torch.ops.tbo


@dataclass
class DeepseekV3Config:
    """HF config.json fields (DeepseekV3Config / DeepseekV2Config / kimi_k2); defaults are HF's."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    topk_method: str
    model_type: str = "deepseek_v3"
    n_shared_experts: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int | None = 1
    topk_group: int | None = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    quantization_config: dict | None = None

    def __post_init__(self):
        want = {"noaux_tc": "sigmoid", "group_limited_greedy": "softmax", "greedy": "softmax"}
        if self.topk_method not in want:
            raise ValueError(f"topk_method {self.topk_method!r} not supported (have {sorted(want)})")
        if self.scoring_func != want[self.topk_method]:
            raise ValueError(f"scoring_func {self.scoring_func!r} does not go with topk_method "
                             f"{self.topk_method!r} (expects {want[self.topk_method]!r})")
        kind = rope_type(self.rope_scaling)
        if kind not in (None, "yarn", "default"):
            raise ValueError(f"rope_scaling type {kind!r} not supported (have 'yarn')")
        if self.topk_method == "greedy":  # V2's plain top-k: group limiting with one group
            self.n_group, self.topk_group = 1, 1
        self.n_group, self.topk_group = self.n_group or 1, self.topk_group or 1
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")
        if self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
            raise ValueError("topk_group groups hold fewer experts than num_experts_per_tok")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0


# Checkpoint names: parameter name -> on-disk name ({} = layer, then expert). A tuple is
# concatenated along dim 0; a template with one more {} than its key is stacked over this rank's
# experts. Kimi K2.5 prefixes every name with "language_model." (the loader adds it).
_SAME_IN_LAYER = [
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight",
    "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_a_layernorm.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
]
CHECKPOINT_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"layers.{{}}.{n}": f"model.layers.{{}}.{n}" for n in _SAME_IN_LAYER},
    **swiglu_checkpoint_names("layers.{}.mlp", "model.layers.{}.mlp"),  # dense layers
    **swiglu_checkpoint_names("layers.{}.mlp.shared_experts", "model.layers.{}.mlp.shared_experts"),
    "layers.{}.mlp.experts.w13": ("model.layers.{}.mlp.experts.{}.gate_proj.weight",
                                  "model.layers.{}.mlp.experts.{}.up_proj.weight"),
    "layers.{}.mlp.experts.w2": "model.layers.{}.mlp.experts.{}.down_proj.weight",
}


# Step 1: rotary embedding (yarn: attention.py) ------------------------------------------------

def apply_rope_interleaved(x_TxR: Tensor, positions_T: Tensor, inv_freq: Tensor, mul: float) -> Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by positions * inv_freq[i] (times `mul`); x is [T, ..., R]."""
    return ops.rope_interleaved(x_TxR, positions_T, inv_freq, mul)


# Step 2: MLA ---------------------------------------------------------------------------------

class MLA(nn.Module):
    def __init__(self, cfg: DeepseekV3Config, block_size: int, dtype=None):
        super().__init__()
        D, H, C = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        self.H, self.N, self.R, self.Dv, self.C = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, C
        self.block_size = block_size
        lin = lambda i, o: nn.Linear(i, o, bias=False, dtype=dtype)  # noqa: E731
        if cfg.q_lora_rank:
            self.q_a_proj = lin(D, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b_proj = lin(cfg.q_lora_rank, H * cfg.qk_head_dim)
        else:
            self.q_proj = lin(D, H * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = lin(D, C + self.R)
        self.kv_a_layernorm = RMSNorm(C, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = lin(C, H * (self.N + self.Dv))
        self.o_proj = lin(H * self.Dv, D)
        self.scale = cfg.qk_head_dim ** -0.5
        sc = cfg.rope_scaling or {}
        if rope_type(sc) == "yarn" and sc.get("mscale_all_dim"):
            self.scale *= yarn_mscale(sc["factor"], sc["mscale_all_dim"]) ** 2

    def q(self, x_TD: Tensor) -> Tensor:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_TD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_TD)))
        return q.view(x_TD.shape[0], self.H, self.N + self.R)

    def forward(self, x_TD, positions_T, slot_mapping_T, block_table_TB, cache_SC, rope) -> Tensor:
        T = x_TD.shape[0]
        q_nope_THN, q_pe_THR = self.q(x_TD).split([self.N, self.R], dim=-1)
        c_kv_TC, k_pe_TR = self.kv_a_proj_with_mqa(x_TD).split([self.C, self.R], dim=-1)
        q_pe_THR = rope(q_pe_THR, positions_T)
        entry_TC = torch.cat([self.kv_a_layernorm(c_kv_TC), rope(k_pe_TR, positions_T)], dim=-1)
        cache_SC.index_put_((slot_mapping_T,), entry_TC.to(cache_SC.dtype))
        w_HXC = self.kv_b_proj.weight.view(self.H, self.N + self.Dv, self.C)
        q_abs_THC = torch.einsum("thn,hnc->thc", q_nope_THN, w_HXC[:, : self.N])
        o_lat_THC = ops.latent_attention(q_abs_THC, q_pe_THR, cache_SC, block_table_TB, positions_T,
                                         self.block_size, self.scale)
        o_THV = torch.einsum("thc,hvc->thv", o_lat_THC, w_HXC[:, self.N:])
        return self.o_proj(o_THV.reshape(T, self.H * self.Dv))


# Step 3: routers (fp32) ----------------------------------------------------------------------

def _keep_top_groups(choice_TE: Tensor, group_score_TG: Tensor, topk_group: int) -> Tensor:
    """Experts outside the topk_group best groups get -inf, so top-k never picks them."""
    T, G = group_score_TG.shape
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_score_TG.topk(topk_group, dim=-1).indices, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, G, choice_TE.shape[1] // G).reshape(T, choice_TE.shape[1])
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


class NoAuxTCRouter(nn.Module):
    """V3: sigmoid scores; the bias only steers the choice; weights are the unbiased scores."""

    def __init__(self, cfg: DeepseekV3Config, dtype=None):
        super().__init__()
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=dtype))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32))
        self.k, self.G, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        s_TE = torch.sigmoid(torch.ops.tbo.linear_f32(x_TD, self.weight))
        choice_TE = s_TE + self.e_score_correction_bias.float()
        if self.G > 1:
            T, E = choice_TE.shape
            group_TG = choice_TE.view(T, self.G, E // self.G).topk(2, dim=-1).values.sum(-1)
            choice_TE = _keep_top_groups(choice_TE, group_TG, self.topk_group)
        ids_TK = choice_TE.topk(self.k, dim=-1).indices
        w_TK = s_TE.gather(1, ids_TK)
        if self.norm:
            w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
        return ids_TK, w_TK * self.scaling


class GroupLimitedGreedyRouter(nn.Module):
    """V2: softmax scores; group score = best expert in the group."""

    def __init__(self, cfg: DeepseekV3Config, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype))
        self.k, self.G, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        s_TE = torch.ops.tbo.linear_f32(x_TD, self.weight).softmax(-1)
        choice_TE = s_TE
        if self.G > 1:
            T, E = s_TE.shape
            choice_TE = _keep_top_groups(s_TE, s_TE.view(T, self.G, E // self.G).amax(-1), self.topk_group)
        w_TK, ids_TK = choice_TE.topk(self.k, dim=-1)
        if self.norm:
            w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
        return ids_TK, w_TK * self.scaling


# Step 4: the model: the shared shell with MLA and DeepSeekMoE ---------------------------------

class DeepseekV3Model(DecoderModel):
    checkpoint_names = CHECKPOINT_NAMES

    def make_attention(self, i: int) -> MLA:
        return MLA(self.config, self.block_size, self.dtype)

    def make_mlp(self, i: int, par: ParallelConfig) -> tuple[nn.Module, bool]:
        c, D, dt = self.config, self.config.hidden_size, self.dtype
        if not c.is_moe_layer(i):
            return SwiGLU(D, c.intermediate_size, dt), False
        router = (NoAuxTCRouter if c.topk_method == "noaux_tc" else GroupLimitedGreedyRouter)(c, dt)
        shared = SwiGLU(D, c.n_shared_experts * c.moe_intermediate_size, dt) if c.n_shared_experts else None
        return MoEBlock(router, c.n_routed_experts, D, c.moe_intermediate_size, par, shared=shared, dtype=dt), True

    def rope_table(self) -> tuple[Tensor, float]:
        return rope_inv_freq(self.config.qk_rope_head_dim, self.config.rope_theta, self.config.rope_scaling)

    def rope(self, x: Tensor, positions_T: Tensor) -> Tensor:
        return apply_rope_interleaved(x, positions_T, self.inv_freq, self.rope_mul)

    def cache_entry_shape(self, i: int) -> tuple[int, ...]:
        return (self.config.kv_lora_rank + self.config.qk_rope_head_dim,)
