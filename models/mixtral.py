"""Mixtral (`MixtralForCausalLM`, 8x7B / 8x22B): GQA attention and a softmax top-2 sparse MoE.

What differs from the shared shell (decoder.py) and layers (attention.py, moe.py): nothing but
the names and the config: plain GQA (no biases, no q/k norm; a sliding window on every layer when
`sliding_window` is set), router = softmax over all experts, top-k, renormalised over the k;
SiLU GLU experts stored per expert as w1 (gate), w3 (up), w2 (down) under `block_sparse_moe`.

Cache entry per token and layer: [2, G, Dh] (k, v). RoPE is half-split.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from tbo_compiler.models.attention import GQAAttention, RopeHalf, qkv_checkpoint_names, rope_inv_freq
from tbo_compiler.models.decoder import DecoderModel
from tbo_compiler.models.moe import MoEBlock, ParallelConfig, SoftmaxTopkRouter


@dataclass
class MixtralConfig:
    """HF config.json fields (MixtralConfig); defaults are HF's."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    model_type: str = "mixtral"
    head_dim: int | None = None
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    quantization_config: dict | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.rope_scaling:
            raise ValueError(f"rope_scaling {self.rope_scaling!r} is not supported for mixtral")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in 1..{self.num_local_experts}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive or null, got {self.sliding_window}")


# Checkpoint names: parameter name -> on-disk name ({} = layer, then expert). A tuple is
# concatenated along dim 0 (a RowParts: in parts of its own sizes, q|k|v); a template with one more
# {} than its key is stacked over this rank's experts.
_SAME_IN_LAYER = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"]
_MOE = "model.layers.{}.block_sparse_moe"
CHECKPOINT_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"layers.{{}}.{n}": f"model.layers.{{}}.{n}" for n in _SAME_IN_LAYER},
    **qkv_checkpoint_names("layers.{}.self_attn", "model.layers.{}.self_attn"),
    "layers.{}.mlp.gate.weight": f"{_MOE}.gate.weight",
    "layers.{}.mlp.experts.w13": (f"{_MOE}.experts.{{}}.w1.weight", f"{_MOE}.experts.{{}}.w3.weight"),
    "layers.{}.mlp.experts.w2": f"{_MOE}.experts.{{}}.w2.weight",
}


class MixtralModel(DecoderModel):
    checkpoint_names = CHECKPOINT_NAMES

    def make_attention(self, i: int) -> GQAAttention:
        c = self.config
        return GQAAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                            self.block_size, window=c.sliding_window or 0, dtype=self.dtype)

    def make_mlp(self, i: int, par: ParallelConfig) -> tuple[nn.Module, bool]:
        c = self.config
        router = SoftmaxTopkRouter(c.num_local_experts, c.hidden_size, c.num_experts_per_tok, True, self.dtype)
        return MoEBlock(router, c.num_local_experts, c.hidden_size, c.intermediate_size, par, dtype=self.dtype), True

    def rope_table(self) -> tuple[Tensor, float]:
        return rope_inv_freq(self.config.head_dim, self.config.rope_theta, None)

    @property
    def rope(self) -> RopeHalf:  # a property: the shell's `self.rope` is a RopeHalf on the current table
        return RopeHalf(self.inv_freq)

    def cache_entry_shape(self, i: int) -> tuple[int, ...]:
        return (2, self.config.num_key_value_heads, self.config.head_dim)
