"""GPT-OSS (`GptOssForCausalLM`, 20b / 120b): GQA with attention sinks and a sliding window on
alternating layers, biased router, GLU experts with biases and a clamped activation, MXFP4 experts.

What differs from the shared shell (decoder.py) and layers (attention.py, moe.py):
  attention  q/k/v/o biases; `sinks` [H], a learned logit per head that joins the softmax and is
             dropped after; layers whose `layer_types` entry is "sliding_attention" see only the
             last `sliding_window` positions. Yarn RoPE, half-split, not truncated; its cos/sin
             multiplier m (0.1 ln(factor) + 1) scales q and k alike, so it is folded into the
             softmax scale as m^2 (the sinks are not scaled, as in the reference).
  router     logits = x W^T + b; top-k on the logits; softmax over the k chosen (fp32).
  experts    [g | u] = w13 x + b13, h = (clamp(u, -L, L) + 1) * g' sigmoid(1.702 g'),
             g' = min(g, L), L = swiglu_limit; y = w2 h + b2 (tbo::moe_experts, activation
             "gpt_oss"). On disk gate and up rows alternate (gate = rows 0, 2, ..., up = 1, 3, ...);
             the loader stores them as [gate; up] like every other model here.
  weights    every expert of a layer in one tensor: gate_up_proj_{blocks,scales} [E, 2I, D/32, 16 | -]
             MXFP4 (quant.py), gate_up_proj_bias [E, 2I], down_proj_{blocks,scales,bias}.

Legend: T tokens, D hidden, E experts, K experts per token.
Cache entry per token and layer: [2, G, Dh] (k, v).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbo_compiler.models.attention import GQAAttention, RopeHalf, qkv_checkpoint_names, rope_inv_freq, rope_type
from tbo_compiler.models.decoder import DecoderModel
from tbo_compiler.models.moe import FusedExperts, MoEBlock, ParallelConfig

ops = torch.ops.tbo

LAYER_TYPES = ("sliding_attention", "full_attention")


def _default_rope_scaling() -> dict:  # HF's GptOssConfig default
    return {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 4096}


@dataclass
class GptOssConfig:
    """HF config.json fields (GptOssConfig); defaults are HF's."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    model_type: str = "gpt_oss"
    head_dim: int = 64
    sliding_window: int = 128
    layer_types: list | None = None
    rope_theta: float = 150000.0
    rope_scaling: dict | None = field(default_factory=_default_rope_scaling)
    attention_bias: bool = True
    swiglu_limit: float = 7.0
    tie_word_embeddings: bool = False
    quantization_config: dict | None = None

    def __post_init__(self):
        if self.layer_types is None:  # HF's default: even layers slide
            self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"layer_types holds {bad}; supported: {', '.join(LAYER_TYPES)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError(f"sliding layers need a positive sliding_window, got {self.sliding_window!r}")
        if rope_type(self.rope_scaling) not in (None, "yarn", "default"):
            raise ValueError(f"rope_scaling type {rope_type(self.rope_scaling)!r} not supported (have 'yarn')")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in 1..{self.num_local_experts}")

    def window(self, i: int) -> int:
        """Layer i's sliding window (0: full attention)."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else 0


# Checkpoint names: parameter name -> on-disk name ({} = layer). RowParts: q|k|v concatenated along
# dim 0; FusedExperts: one tensor holds every expert of the layer.
_SAME_IN_LAYER = [
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.sinks",
    "self_attn.o_proj.weight", "self_attn.o_proj.bias",
]
_EXPERTS = "model.layers.{}.mlp.experts."
CHECKPOINT_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"layers.{{}}.{n}": f"model.layers.{{}}.{n}" for n in _SAME_IN_LAYER},
    **qkv_checkpoint_names("layers.{}.self_attn", "model.layers.{}.self_attn"),
    "layers.{}.mlp.gate.weight": "model.layers.{}.mlp.router.weight",
    "layers.{}.mlp.gate.bias": "model.layers.{}.mlp.router.bias",
    "layers.{}.mlp.experts.w13": FusedExperts(_EXPERTS + "gate_up_proj", deinterleave=True, mxfp4=True),
    "layers.{}.mlp.experts.w13_bias": FusedExperts(_EXPERTS + "gate_up_proj_bias", deinterleave=True),
    "layers.{}.mlp.experts.w2": FusedExperts(_EXPERTS + "down_proj", mxfp4=True),
    "layers.{}.mlp.experts.w2_bias": FusedExperts(_EXPERTS + "down_proj_bias"),
}


class TopkSoftmaxRouter(nn.Module):
    """Top-k of the biased logits, then softmax over the k chosen (fp32)."""

    def __init__(self, cfg: GptOssConfig, dtype=None):
        super().__init__()
        E, D = cfg.num_local_experts, cfg.hidden_size
        self.weight = nn.Parameter(torch.empty(E, D, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(E, dtype=dtype))
        self.k = cfg.num_experts_per_tok

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        logits_TE = torch.ops.tbo.linear_f32(x_TD, self.weight, self.bias)
        return torch.ops.tbo.route_topk(logits_TE, self.k, "topk_softmax")


class GptOssModel(DecoderModel):
    checkpoint_names = CHECKPOINT_NAMES

    def make_attention(self, i: int) -> GQAAttention:
        c = self.config
        mul = self.rope_table()[1]
        return GQAAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                            self.block_size, bias=c.attention_bias, sinks=True, window=c.window(i),
                            scale=c.head_dim ** -0.5 * mul * mul, dtype=self.dtype)

    def make_mlp(self, i: int, par: ParallelConfig) -> tuple[nn.Module, bool]:
        c = self.config
        return MoEBlock(TopkSoftmaxRouter(c, self.dtype), c.num_local_experts, c.hidden_size,
                        c.intermediate_size, par, dtype=self.dtype, expert_bias=True, activation="gpt_oss",
                        limit=c.swiglu_limit or 0.0), True

    def rope_table(self) -> tuple[Tensor, float]:
        return rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)

    @property
    def rope(self) -> RopeHalf:  # a property: the shell's `self.rope` is a RopeHalf on the current table
        return RopeHalf(self.inv_freq)  # the yarn multiplier is in the scale

    def cache_entry_shape(self, i: int) -> tuple[int, ...]:
        return (2, self.config.num_key_value_heads, self.config.head_dim)
