"""Attention pieces shared by the architectures: rotary tables (plain and yarn) and GQA attention
over the paged cache (Qwen3-MoE, Mixtral, GPT-OSS; DeepSeek's MLA lives in deepseek_v3.py).

Legend: T tokens, D hidden, H query heads, G kv heads, Dh head_dim, N = (H + 2G) * Dh, S cache
slots (num_blocks * block_size), B blocks per request.

GQA projections: one GEMM, qkv_proj [N, D], its output split into q, k and v by views
(no copy; the ops after it read strided rows). In decode each of three separate GEMMs is small and
launch-bound (Qwen3-30B-A3B, decode 256, H200: 11.4 + 5.8 + 5.8 us a layer for 4.4 us of weight
bytes). Checkpoints keep HF's q_proj/k_proj/v_proj: the loader concatenates them (RowParts).

GQA cache entry per token and layer: [2, G, Dh] (k, v), keys stored after RoPE. With a RopeHalf
(Qwen3-MoE, Mixtral, GPT-OSS) the q/k norms, both ropes and the entry are one kernel,
tbo.qk_rope_kv (the same bits as the ops; on an H200 faster than them at 256 and at 4096 tokens,
bench/rope_bench.py); any other Rope runs as the separate ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from tbo_compiler.models.moe import RMSNorm

ops = torch.ops.tbo

#: rope(x [T, heads, R], positions_T) -> x rotated: what the model shell hands every attention
Rope = Callable[[Tensor, Tensor], Tensor]


class RopeHalf:
    """The Rope of half-split pairs (x[i], x[i + R/2]) over a table: tbo.rope_half. An architecture
    returns one from its `rope` (a property, so it reads the model's current inv_freq buffer);
    GQAAttention recognises it by `kind` and folds it into tbo.qk_rope_kv."""
    kind = "half"

    def __init__(self, inv_freq: Tensor):
        self.inv_freq = inv_freq

    def __call__(self, x: Tensor, positions_T: Tensor) -> Tensor:
        return ops.rope_half(x, positions_T, self.inv_freq)


# Step 1: rotary tables -------------------------------------------------------------------------

def rope_type(scaling: dict | None) -> str | None:
    """The rope_scaling kind (HF spells the key `type` or `rope_type`); None without scaling."""
    if not scaling:
        return None
    return scaling.get("type", scaling.get("rope_type"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> tuple[Tensor, float]:
    """-> (inv_freq [dim/2], cos/sin multiplier). Yarn blends interpolated (slow) and original
    (fast) frequencies with a linear ramp between the correction dims of beta_fast/beta_slow;
    those dims are floored/ceiled unless the config says `truncate: false` (GPT-OSS)."""
    extra = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope_type(scaling) != "yarn":
        return extra, 1.0
    factor = scaling["factor"]
    orig = scaling.get("original_max_position_embeddings", 4096)

    def corr_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = corr_dim(scaling.get("beta_fast", 32)), corr_dim(scaling.get("beta_slow", 1))
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    inv_freq = extra / factor * ramp + extra * (1 - ramp)
    attn = yarn_mscale(factor, scaling.get("mscale", 1)) / yarn_mscale(factor, scaling.get("mscale_all_dim", 0))
    return inv_freq, attn


# Step 2: GQA attention -------------------------------------------------------------------------

@dataclass(frozen=True)
class RowParts:
    """Checkpoint name templates whose tensors are concatenated along dim 0 (per expert when the
    templates take one more {} than the parameter name) in parts of `rows(config)` rows each: for
    parts of unequal sizes, where a plain tuple of templates means equal parts."""
    templates: tuple[str, ...]
    rows: Callable[[object], tuple[int, ...]]


def qkv_rows(cfg) -> tuple[int, int, int]:
    """Rows of q, k and v in qkv_proj, from the HF config fields every GQA architecture here shares."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return q, kv, kv


def qkv_checkpoint_names(param_prefix: str, disk_prefix: str) -> dict:
    """Templates of GQAAttention's qkv_proj weight and bias at `param_prefix`, stored as HF's separate
    q_proj/k_proj/v_proj under `disk_prefix` (a model without biases never reads the bias ones)."""
    return {f"{param_prefix}.qkv_proj.{w}": RowParts(tuple(f"{disk_prefix}.{p}_proj.{w}" for p in "qkv"), qkv_rows)
            for w in ("weight", "bias")}


class GQAAttention(nn.Module):
    """Grouped-query attention over the paged cache, with the variants the architectures need:
    q/k/v/o biases, per-head q/k RMSNorm before RoPE (Qwen3), attention sinks (a learned per-head
    logit in the softmax, GPT-OSS) and a sliding window (the last `window` positions, GPT-OSS's
    even layers). `scale` defaults to Dh^-0.5. q, k and v are one GEMM (qkv_proj, rows [q; k; v])."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, block_size: int, *,
                 bias: bool = False, qk_norm_eps: float | None = None, sinks: bool = False,
                 window: int = 0, scale: float | None = None, dtype=None):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        self.H, self.G, self.Dh = heads, kv_heads, head_dim
        self.qkv_proj = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=bias, dtype=dtype)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias, dtype=dtype)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype)
        # fp32 like a router's statistics: the sink is a logit compared with fp32 scores
        self.sinks = nn.Parameter(torch.zeros(heads, dtype=torch.float32)) if sinks else None
        self.block_size, self.window = block_size, window
        self.scale = head_dim ** -0.5 if scale is None else scale

    def forward(self, x_TD: Tensor, positions_T: Tensor, slot_mapping_T: Tensor, block_table_TB: Tensor,
                cache_S2GD: Tensor, rope: Rope) -> Tensor:
        T = x_TD.shape[0]
        qkv_TN = self.qkv_proj(x_TD)  # q, k, v: views of its columns
        nq, nkv = self.H * self.Dh, self.G * self.Dh
        q_THD = qkv_TN[:, :nq].view(T, self.H, self.Dh)
        k_TGD = qkv_TN[:, nq:nq + nkv].view(T, self.G, self.Dh)
        v_TGD = qkv_TN[:, nq + nkv:].view(T, self.G, self.Dh)
        norms = hasattr(self, "q_norm")
        if getattr(rope, "kind", None) == "half":  # norms, ropes and the k|v entry: one kernel
            qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if norms else ()
            q_THD, kv_T2GD = ops.qk_rope_kv(q_THD, k_TGD, v_TGD, positions_T, rope.inv_freq, *qk_norm)
        else:
            if norms:
                q_THD, k_TGD = self.q_norm(q_THD), self.k_norm(k_TGD)
            q_THD, k_TGD = rope(q_THD, positions_T), rope(k_TGD, positions_T)
            kv_T2GD = torch.stack([k_TGD, v_TGD], 1)
        cache_S2GD.index_put_((slot_mapping_T,), kv_T2GD.to(cache_S2GD.dtype))
        args = (q_THD, cache_S2GD, block_table_TB, positions_T, self.block_size, self.scale)
        if self.sinks is not None or self.window:  # plain GQA calls the op with its original arguments
            args += (self.sinks, self.window)
        o_THD = ops.paged_attention(*args)
        return self.o_proj(o_THD.reshape(T, self.H * self.Dh))
