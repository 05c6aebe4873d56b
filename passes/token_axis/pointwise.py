"""Pointwise family: elementwise ops with broadcasting (every op tagged pointwise, plus the
elementwise ops torch does not tag: copies, *_like, masked_fill, where)."""
from __future__ import annotations

import torch

from tbo_compiler.passes.token_axis.helpers import fail, only_tokendims, shape, tensor_args, token_inputs, val
from tbo_compiler.passes.token_axis.lattice import SHARED, TokenDim, is_token_dependent
from tbo_compiler.passes.token_axis.registry import register, register_fallback

aten = torch.ops.aten


@register_fallback("pointwise", "pointwise")
@register("pointwise", aten.alias.default, alias=True)
@register("pointwise", aten._to_copy.default, aten.clone.default, aten.detach.default, aten.contiguous.default,
          aten.lift_fresh_copy.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
          aten.full_like.default, aten.rand_like.default, aten.fill.Scalar, aten.copy.default,
          aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.silu.default, aten.gelu.default)
def rule_pointwise(node, ctx):
    ins = only_tokendims(node, ctx)
    if not ins:
        return SHARED
    out_shape = shape(node)
    r = len(out_shape)
    result = None
    for a, ax in ins:
        oa = ax.axis + (r - len(shape(a)))
        if shape(a)[ax.axis] != out_shape[oa]:
            fail(node, f"token axis of {a.name} is broadcast")
        cand = TokenDim(oa, ax.outer, ax.inner)
        if result is not None and result != cand:
            fail(node, f"inputs put tokens on different axes ({result} vs {cand})")
        result = cand
    # a shared input with a full-size dim at the token axis pairs its rows with the tokens:
    # each ubatch reads its rows of it
    for a in tensor_args(node):
        if not is_token_dependent(ctx.ax(a)) and val(a) is not None and hasattr(val(a), "shape"):
            s = shape(a)
            k = result.axis - (r - len(s))
            if 0 <= k < len(s) and s[k] == out_shape[result.axis] and s[k] != 1:
                ctx.align(node, a, TokenDim(k, result.outer, result.inner))
    return result


@register("pointwise", aten.view.dtype)
def rule_same(node, ctx):
    ins = token_inputs(node, ctx)
    return ins[0][1] if ins else SHARED
