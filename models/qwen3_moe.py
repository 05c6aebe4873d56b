"""Qwen3-MoE: GQA attention with per-head q/k RMSNorm, softmax top-k MoE without shared experts.

Legend: T tokens, D hidden, V vocab, H query heads, G kv heads, Dh head_dim, E experts,
K experts per token, S cache slots (num_blocks * block_size), B blocks per request.

Cache entry per token and layer: [2, G, Dh] (k, v). RoPE is half-split (rotate_half) style.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbo_compiler.models.batch import PagedKVCache, is_padding
from tbo_compiler.models.moe import MoEBlock, ParallelConfig, RMSNorm, SwiGLU, swiglu_checkpoint_names

ops = torch.ops.tbo


@dataclass
class Qwen3MoeConfig:
    """HF config.json fields (Qwen3MoeConfig); defaults are HF's."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    model_type: str = "qwen3_moe"
    head_dim: int | None = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    quantization_config: dict | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.rope_scaling:
            raise ValueError(f"rope_scaling {self.rope_scaling!r} is not supported for qwen3_moe")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads is not a multiple of num_key_value_heads")

    def is_moe_layer(self, i: int) -> bool:
        return (i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)


# Checkpoint names: parameter name -> on-disk name ({} = layer, then expert). A tuple is
# concatenated along dim 0; a template with one more {} than its key is stacked over this rank's
# experts.
_SAME_IN_LAYER = [
    "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")),
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate.weight",
]
CHECKPOINT_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"layers.{{}}.{n}": f"model.layers.{{}}.{n}" for n in _SAME_IN_LAYER},
    **swiglu_checkpoint_names("layers.{}.mlp", "model.layers.{}.mlp"),  # dense layers
    "layers.{}.mlp.experts.w13": ("model.layers.{}.mlp.experts.{}.gate_proj.weight",
                                  "model.layers.{}.mlp.experts.{}.up_proj.weight"),
    "layers.{}.mlp.experts.w2": "model.layers.{}.mlp.experts.{}.down_proj.weight",
}


def apply_rope_half(x_TxD: Tensor, positions_T: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + Dh/2]) by positions * inv_freq[i]; x is [T, heads, Dh]."""
    return ops.rope_half(x_TxD, positions_T, inv_freq)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, block_size: int, dtype=None):
        super().__init__()
        D, self.H, self.G, self.Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(D, self.H * self.Dh, bias=b, dtype=dtype)
        self.k_proj = nn.Linear(D, self.G * self.Dh, bias=b, dtype=dtype)
        self.v_proj = nn.Linear(D, self.G * self.Dh, bias=b, dtype=dtype)
        self.o_proj = nn.Linear(self.H * self.Dh, D, bias=b, dtype=dtype)
        self.q_norm = RMSNorm(self.Dh, cfg.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(self.Dh, cfg.rms_norm_eps, dtype)
        self.block_size, self.scale = block_size, self.Dh ** -0.5

    def forward(self, x_TD, positions_T, slot_mapping_T, block_table_TB, cache_S2GD, inv_freq) -> Tensor:
        T = x_TD.shape[0]
        q_THD = apply_rope_half(self.q_norm(self.q_proj(x_TD).view(T, self.H, self.Dh)), positions_T, inv_freq)
        k_TGD = apply_rope_half(self.k_norm(self.k_proj(x_TD).view(T, self.G, self.Dh)), positions_T, inv_freq)
        v_TGD = self.v_proj(x_TD).view(T, self.G, self.Dh)
        cache_S2GD.index_put_((slot_mapping_T,), torch.stack([k_TGD, v_TGD], 1).to(cache_S2GD.dtype))
        o_THD = ops.paged_attention(q_THD, cache_S2GD, block_table_TB, positions_T, self.block_size, self.scale)
        return self.o_proj(o_THD.reshape(T, self.H * self.Dh))


class SoftmaxTopkRouter(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, dtype=dtype))
        self.k, self.norm = cfg.num_experts_per_tok, cfg.norm_topk_prob

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        p_TE = F.linear(x_TD.float(), self.weight.float()).softmax(-1)
        w_TK, ids_TK = p_TE.topk(self.k, dim=-1)
        if self.norm:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return ids_TK, w_TK


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, i: int, par: ParallelConfig, block_size: int, dtype=None):
        super().__init__()
        D = cfg.hidden_size
        self.input_layernorm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, block_size, dtype)
        self.is_moe = cfg.is_moe_layer(i)
        if self.is_moe:
            self.mlp = MoEBlock(SoftmaxTopkRouter(cfg, dtype), cfg.num_experts, D,
                                cfg.moe_intermediate_size, par, dtype=dtype)
        else:
            self.mlp = SwiGLU(D, cfg.intermediate_size, dtype)

    def forward(self, h_TD, positions_T, slot_mapping_T, block_table_TB, cache, inv_freq, pad_T):
        h_TD = h_TD + self.self_attn(self.input_layernorm(h_TD), positions_T, slot_mapping_T,
                                     block_table_TB, cache, inv_freq)
        x_TD = self.post_attention_layernorm(h_TD)
        return h_TD + (self.mlp(x_TD, pad_T) if self.is_moe else self.mlp(x_TD))


class Qwen3MoeModel(nn.Module):
    checkpoint_names = CHECKPOINT_NAMES
    token_inputs = ("input_ids", "positions", "slot_mapping", "block_table")

    def __init__(self, cfg: Qwen3MoeConfig, par: ParallelConfig | None = None, block_size: int = 16,
                 dtype=torch.float32):
        super().__init__()
        self.config, self.block_size, self.dtype = cfg, block_size, dtype
        par = par or ParallelConfig()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, par, block_size, dtype)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the rope table and re-tie embeddings: the loader builds the model on the
        meta device and calls this after `to_empty`, which leaves buffers and ties behind."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        Dh = self.config.head_dim
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)
        self.register_buffer("inv_freq", inv_freq.to(self.embed_tokens.weight.device), persistent=False)

    def kv_cache_entry_shapes(self) -> list[tuple[int, ...]]:
        c = self.config
        return [(2, c.num_key_value_heads, c.head_dim)] * c.num_hidden_layers

    def new_kv_cache(self, num_blocks: int, *, dtype=None, device=None) -> PagedKVCache:
        return PagedKVCache(self.kv_cache_entry_shapes(), num_blocks, self.block_size,
                            dtype=dtype or self.dtype, device=device or self.embed_tokens.weight.device)

    def forward(self, input_ids: Tensor, positions: Tensor, slot_mapping: Tensor, block_table: Tensor,
                kv_caches: list[Tensor]) -> Tensor:
        pad_T = is_padding(slot_mapping, self.block_size)
        h_TD = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, kv_caches):
            h_TD = layer(h_TD, positions, slot_mapping, block_table, cache, self.inv_freq, pad_T)
        return self.lm_head(self.norm(h_TD)).float()
