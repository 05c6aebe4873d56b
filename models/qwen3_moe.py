"""Qwen3-MoE: GQA attention with per-head q/k RMSNorm, softmax top-k MoE without shared experts.

What differs from the shared shell (decoder.py) and layers (attention.py, moe.py): the q/k norms,
the router's optional renormalisation, dense layers by `mlp_only_layers`/`decoder_sparse_step`.

Legend: T tokens, D hidden, Dh head_dim, E experts, K experts per token.

Cache entry per token and layer: [2, G, Dh] (k, v). RoPE is half-split (rotate_half) style.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from tbo_compiler.models import moe
from tbo_compiler.models.attention import GQAAttention, RopeHalf, qkv_checkpoint_names, rope_inv_freq
from tbo_compiler.models.decoder import DecoderModel
from tbo_compiler.models.moe import MoEBlock, ParallelConfig, SwiGLU, swiglu_checkpoint_names


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

    def is_moe_layer(self, i: int) -> bool:
        return (i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)


# Checkpoint names: parameter name -> on-disk name ({} = layer, then expert). A tuple is
# concatenated along dim 0 (a RowParts: in parts of its own sizes, q|k|v); a template with one more
# {} than its key is stacked over this rank's experts.
_SAME_IN_LAYER = [
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.o_proj.weight", "self_attn.o_proj.bias",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate.weight",
]
CHECKPOINT_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"layers.{{}}.{n}": f"model.layers.{{}}.{n}" for n in _SAME_IN_LAYER},
    **qkv_checkpoint_names("layers.{}.self_attn", "model.layers.{}.self_attn"),
    **swiglu_checkpoint_names("layers.{}.mlp", "model.layers.{}.mlp"),  # dense layers
    "layers.{}.mlp.experts.w13": ("model.layers.{}.mlp.experts.{}.gate_proj.weight",
                                  "model.layers.{}.mlp.experts.{}.up_proj.weight"),
    "layers.{}.mlp.experts.w2": "model.layers.{}.mlp.experts.{}.down_proj.weight",
}


class SoftmaxTopkRouter(moe.SoftmaxTopkRouter):
    """Softmax over the experts, top-k, renormalised when norm_topk_prob."""

    def __init__(self, cfg: Qwen3MoeConfig, dtype=None):
        super().__init__(cfg.num_experts, cfg.hidden_size, cfg.num_experts_per_tok, cfg.norm_topk_prob, dtype)


class Qwen3MoeModel(DecoderModel):
    checkpoint_names = CHECKPOINT_NAMES

    def make_attention(self, i: int) -> GQAAttention:
        c = self.config
        return GQAAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                            self.block_size, bias=c.attention_bias, qk_norm_eps=c.rms_norm_eps, dtype=self.dtype)

    def make_mlp(self, i: int, par: ParallelConfig) -> tuple[nn.Module, bool]:
        c = self.config
        if c.is_moe_layer(i):
            return MoEBlock(SoftmaxTopkRouter(c, self.dtype), c.num_experts, c.hidden_size,
                            c.moe_intermediate_size, par, dtype=self.dtype), True
        return SwiGLU(c.hidden_size, c.intermediate_size, self.dtype), False

    def rope_table(self) -> tuple[Tensor, float]:
        return rope_inv_freq(self.config.head_dim, self.config.rope_theta, None)

    @property
    def rope(self) -> RopeHalf:  # a property: the shell's `self.rope` is a RopeHalf on the current table
        return RopeHalf(self.inv_freq)

    def cache_entry_shape(self, i: int) -> tuple[int, ...]:
        return (2, self.config.num_key_value_heads, self.config.head_dim)
