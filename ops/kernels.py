"""Compute kernels as `tbo` custom ops: schemas and fake implementations (shapes only).

Legend: T tokens, H query heads, G kv heads, Dh head dim, C cache entry width, NB blocks per
request, BS block size, N rows (tokens as the experts see them), K experts per token, E experts
on this rank, I expert ffn width, D hidden, R rope dims, W ranks.

Row-wise ops: row t of every output depends only on row t of the token-axis inputs (and on shared
tensors: caches, weights). The split pass relies on it (passes/README.md, invariant 5).

  paged_attention(q_THD, kv_cache_N2GD, block_table_TNB, positions_T, block_size, scale,
                  sinks_H=None, window=0) -> o_THD
      token t attends to the cache slots of its own request (its row of block_table) at logical
      positions <= positions[t]. The cache must already hold this step's keys/values.
      window > 0 (sliding window): only positions > positions[t] - window, i.e. the last `window`
      positions including its own. sinks_H (attention sinks, one logit per query head): the head's
      logit joins the softmax's denominator as one more key with no value (its share is dropped).
  latent_attention(q_lat_THV, q_pe_THR, cache_NC, block_table_TNB, positions_T, block_size, scale) -> o_THV
      MQA over a shared latent cache (MLA's absorbed form): the query is [q_lat | q_pe] (two tensors,
      so nobody concatenates them), keys = cache[:, :V+R], values = cache[:, :V].
  moe_experts(x_ND, topk_ids_NK, topk_w_NK, w13_E2ID, w2_EDI, w13_bias_E2I=None, w2_bias_ED=None,
              activation="silu", limit=0.0) -> y_ND
      sum over k of w[n,k] * expert_{ids[n,k]}(x[n]); ids < 0 contribute nothing. GLU experts:
      [g | u] = w13[e] x + b13[e], h = act(g, u), expert(x) = w2[e] h + b2[e] (biases optional), with
        activation "silu":    act = silu(g) * u
        activation "gpt_oss": act = (u + 1) * g * sigmoid(1.702 g)
      and, when limit > 0, g clamped to <= limit and u to [-limit, limit] first.
  rms_norm(x_xD, weight_D, eps) -> weight * (x / rms(x)) (statistics in fp32, product in x's dtype)
  add_rms_norm(x_xD, residual_xD, weight_D, eps) -> (rms_norm(h, weight, eps), h), h = x + residual
      in x's dtype (the decoder's residual add and the norm after it, one kernel)
  silu_mul(gu_x2I) -> silu(gu[..., :I]) * gu[..., I:]
  rope_interleaved(x_TxR, positions_T, inv_freq, mul) -> x rotated on pairs (x[2i], x[2i+1])
  rope_half(x_THD, positions_T, inv_freq) -> x rotated on pairs (x[i], x[i + D/2])
  qk_rope_kv(q_THD, k_TGD, v_TGD, positions_T, inv_freq, q_weight_D=None, k_weight_D=None, eps=0.0)
          -> (rope_half(qn, positions, inv_freq), stack([rope_half(kn, positions, inv_freq), v], 1))
      with qn = rms_norm(q, q_weight, eps) (kn likewise) when the weight is given, else q (k):
      the attention's work before the cache write in one kernel, the same bits as those ops;
      outputs [T, H, Dh] and [T, 2, G, Dh] (the cache entry), dtypes as the ops' (torch's promotion)
  linear_f32(x_xD, weight_ED, bias_E=None) -> F.linear(x.float(), weight.float(), bias.float()), fp32
      (routers: logits in fp32 from 16-bit activations and weights; a 16-bit GEMM accumulating in
      fp32 computes the same products exactly, so a backend may use the tensor cores)
  route_topk(logits_TE, k, scoring="softmax", renormalize=False) -> (ids_TK int64, w_TK fp32)
      scoring "softmax": top-k of softmax(logits) over E, largest first, renormalised over the k
      when asked (Qwen3-MoE, Mixtral); "topk_softmax": top-k of the logits, then softmax over
      the k (GPT-OSS). Equal scores: the lower expert id first.

Not row-wise, the one op that lays tokens out per destination rank:
  dispatch_pack(x_TD, topk_ids_TK, topk_w_TK, world, experts_per_rank) -> (send_x_WTD, send_meta_WT2K)
      Slab d (rows d*T..d*T+T-1) holds, for every token, x if the token has an expert on rank d
      (else zeros), and int32 meta: [:K] the expert's id local to rank d or -1, [K:] its weight's
      fp32 bits (0.0 where -1). The slabs are what dispatch_start sends.

Implementations are bound by the runtime (ops/impl.py); backends live in runtime/kernels/.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tbo_compiler.ops.impl import impl

#: the expert activations moe_experts knows (see the module docstring)
MOE_ACTIVATIONS = ("silu", "gpt_oss")


def _extra(args: tuple, defaults: tuple) -> tuple:
    """Optional trailing arguments up to the last one that is not its default: a call that uses
    none of them reaches the backends with the op's original arguments, eager or compiled alike."""
    n = len(args)
    while n and (args[n - 1] is None if defaults[n - 1] is None else args[n - 1] == defaults[n - 1]):
        n -= 1
    return args[:n]


@torch.library.custom_op("tbo::paged_attention", mutates_args=())
def paged_attention(q: Tensor, kv_cache: Tensor, block_table: Tensor, positions: Tensor,
                    block_size: int, scale: float, sinks: Optional[Tensor] = None, window: int = 0) -> Tensor:
    return impl("paged_attention")(q, kv_cache, block_table, positions, block_size, scale,
                                   *_extra((sinks, window), (None, 0)))


@paged_attention.register_fake
def _(q, kv_cache, block_table, positions, block_size, scale, sinks=None, window=0):
    return torch.empty_like(q)


@torch.library.custom_op("tbo::latent_attention", mutates_args=())
def latent_attention(q_lat: Tensor, q_pe: Tensor, cache: Tensor, block_table: Tensor, positions: Tensor,
                     block_size: int, scale: float) -> Tensor:
    return impl("latent_attention")(q_lat, q_pe, cache, block_table, positions, block_size, scale)


@latent_attention.register_fake
def _(q_lat, q_pe, cache, block_table, positions, block_size, scale):
    return q_lat.new_empty(q_lat.shape)


@torch.library.custom_op("tbo::moe_experts", mutates_args=())
def moe_experts(x: Tensor, topk_ids: Tensor, topk_w: Tensor, w13: Tensor, w2: Tensor,
                w13_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None,
                activation: str = "silu", limit: float = 0.0) -> Tensor:
    return impl("moe_experts")(x, topk_ids, topk_w, w13, w2,
                               *_extra((w13_bias, w2_bias, activation, limit), (None, None, "silu", 0.0)))


@moe_experts.register_fake
def _(x, topk_ids, topk_w, w13, w2, w13_bias=None, w2_bias=None, activation="silu", limit=0.0):
    return torch.empty_like(x)


@torch.library.custom_op("tbo::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return impl("rms_norm")(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("tbo::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return impl("add_rms_norm")(x, residual, weight, eps)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), x.new_empty(x.shape)


@torch.library.custom_op("tbo::silu_mul", mutates_args=())
def silu_mul(gu: Tensor) -> Tensor:
    return impl("silu_mul")(gu)


@silu_mul.register_fake
def _(gu):
    return gu.new_empty(*gu.shape[:-1], gu.shape[-1] // 2)


@torch.library.custom_op("tbo::rope_interleaved", mutates_args=())
def rope_interleaved(x: Tensor, positions: Tensor, inv_freq: Tensor, mul: float) -> Tensor:
    return impl("rope_interleaved")(x, positions, inv_freq, mul)


@rope_interleaved.register_fake
def _(x, positions, inv_freq, mul):
    return x.new_empty(x.shape)


@torch.library.custom_op("tbo::rope_half", mutates_args=())
def rope_half(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    return impl("rope_half")(x, positions, inv_freq)


@rope_half.register_fake
def _(x, positions, inv_freq):
    return x.new_empty(x.shape)


def _promote(x: Tensor, w: Optional[Tensor]) -> torch.dtype:
    return x.dtype if w is None else torch.promote_types(x.dtype, w.dtype)


@torch.library.custom_op("tbo::qk_rope_kv", mutates_args=())
def qk_rope_kv(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor,
               q_weight: Optional[Tensor] = None, k_weight: Optional[Tensor] = None,
               eps: float = 0.0) -> tuple[Tensor, Tensor]:
    return impl("qk_rope_kv")(q, k, v, positions, inv_freq,
                              *_extra((q_weight, k_weight, eps), (None, None, 0.0)))


@qk_rope_kv.register_fake
def _(q, k, v, positions, inv_freq, q_weight=None, k_weight=None, eps=0.0):
    kv_dtype = torch.promote_types(_promote(k, k_weight), v.dtype)
    return q.new_empty(q.shape, dtype=_promote(q, q_weight)), k.new_empty(k.shape[0], 2, *k.shape[1:],
                                                                          dtype=kv_dtype)


@torch.library.custom_op("tbo::linear_f32", mutates_args=())
def linear_f32(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return impl("linear_f32")(x, weight, *_extra((bias,), (None,)))


@linear_f32.register_fake
def _(x, weight, bias=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("tbo::route_topk", mutates_args=())
def route_topk(logits: Tensor, k: int, scoring: str = "softmax",
               renormalize: bool = False) -> tuple[Tensor, Tensor]:
    return impl("route_topk")(logits, k, *_extra((scoring, renormalize), ("softmax", False)))


@route_topk.register_fake
def _(logits, k, scoring="softmax", renormalize=False):
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape, dtype=torch.int64), logits.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("tbo::dispatch_pack", mutates_args=())
def dispatch_pack(x: Tensor, topk_ids: Tensor, topk_w: Tensor, world: int,
                  experts_per_rank: int) -> tuple[Tensor, Tensor]:
    return impl("dispatch_pack")(x, topk_ids, topk_w, world, experts_per_rank)


@dispatch_pack.register_fake
def _(x, topk_ids, topk_w, world, experts_per_rank):
    T, K = topk_ids.shape
    return x.new_empty(world * T, x.shape[1]), x.new_empty(world * T, 2 * K, dtype=torch.int32)


_ops = torch.ops.tbo
#: ops whose output rows follow the rows of their first argument (the split pass's rule)
ROWWISE_OPS = frozenset({_ops.paged_attention.default, _ops.latent_attention.default,
                         _ops.moe_experts.default, _ops.rms_norm.default, _ops.silu_mul.default,
                         _ops.rope_interleaved.default, _ops.rope_half.default, _ops.linear_f32.default,
                         _ops.route_topk.default, _ops.add_rms_norm.default, _ops.qk_rope_kv.default})
#: op -> positional index of its `world` argument: outputs hold `world` blocks of the input's tokens
FAN_OUT_OPS = {_ops.dispatch_pack.default: 3}
#: every kernel op, by name, with its overload (what the backend registry implements)
KERNEL_OPS = {name: getattr(_ops, name).default for name in
              ("paged_attention", "latent_attention", "moe_experts", "rms_norm", "add_rms_norm", "silu_mul",
               "rope_interleaved", "rope_half", "qk_rope_kv", "linear_f32", "route_topk", "dispatch_pack")}


def unpack_meta(meta: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """[R, 2K] int32 dispatch meta -> (local ids [R, K] int32, weights [R, K] fp32): views, no copy."""
    return meta[:, :k], meta[:, k:].view(torch.float32)
