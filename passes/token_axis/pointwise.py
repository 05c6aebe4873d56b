"""Pointwise family: elementwise ops with broadcasting (every op tagged pointwise, plus the
elementwise ops torch does not tag: copies, *_like, masked_fill, where)."""
from __future__ import annotations

from dataclasses import replace

import torch

from tbo_compiler.passes.token_axis.helpers import fail, only_tokendims, shape, tensor_args, token_inputs, val
from tbo_compiler.passes.token_axis.lattice import SHARED, Groups, TokenDim, is_token_dependent
from tbo_compiler.passes.token_axis.registry import register, register_fallback

aten = torch.ops.aten


@register_fallback("pointwise", "pointwise")
@register("pointwise", aten.fill.Scalar, aten.copy.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
          aten.where.self, aten.silu.default, aten.gelu.default)
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
        cand = ax.at(oa)
        if result is not None and result != cand:
            if (result.axis, result.outer, result.inner) == (cand.axis, cand.outer, cand.inner):
                fail(node, f"pairs rows in {_order(result)} with rows in {_order(cand)} (mixes tokens)")
            fail(node, f"inputs put tokens on different axes ({result} vs {cand})")
        result = cand
    # a shared input with a full-size dim at the token axis pairs its rows with the tokens:
    # each ubatch reads its rows of it
    for a in tensor_args(node):
        if not is_token_dependent(ctx.ax(a)) and val(a) is not None and hasattr(val(a), "shape"):
            s = shape(a)
            k = result.axis - (r - len(s))
            if 0 <= k < len(s) and s[k] == out_shape[result.axis] and s[k] != 1:
                ctx.align(node, a, replace(result, axis=k))
    return result


def _order(ax) -> str:
    return "token order" if ax.order is None else f"the order of sort '{ax.order}'"


@register("pointwise", aten.alias.default, alias=True, reads_order=True, keeps_keys=True)
@register("pointwise", aten._to_copy.default, aten.clone.default, aten.detach.default, aten.contiguous.default,
          aten.lift_fresh_copy.default, reads_order=True, keeps_keys=True)
def rule_copy(node, ctx):
    """Copies and casts keep what the values mean (positions, sort keys, per-ubatch counts)."""
    ax = ctx.ax(node.args[0])
    if isinstance(ax, Groups):
        return ax
    out = rule_pointwise(node, ctx)
    if isinstance(ax, TokenDim) and isinstance(out, TokenDim):
        return replace(out, points_to=ax.points_to, keys_of=ax.keys_of)
    return out


@register("pointwise", aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
          aten.full_like.default, aten.rand_like.default, reads_order=True)
def rule_like(node, ctx):
    """*_like(x): x's layout (rows in x's order), none of its values."""
    out = rule_pointwise(node, ctx)
    return replace(out, points_to=None, keys_of=None) if isinstance(out, TokenDim) else out


@register("pointwise", aten.floor_divide.default, aten.floor_divide.Scalar, aten.div.Tensor_mode,
          aten.div.Scalar_mode, reads_order=True)
def rule_floor_divide(node, ctx):
    """Elementwise; on positions of rows (a sort's indices, I rows per token) a division by k
    (k dividing I) gives positions on an axis of I/k rows per token: `perm // top_k` numbers the
    tokens whose (token, k) pairs the sort ordered, and each ubatch's numbers are its own rows.
    Inductor's decompositions write `//` as div(rounding_mode="floor"); positions are >= 0, so
    "trunc" is the same division."""
    x, k = node.args[0], node.args[1]
    ax = ctx.ax(x)
    whole = node.kwargs.get("rounding_mode", "floor") in ("floor", "trunc")
    if (whole and isinstance(ax, TokenDim) and ax.points_to is not None
            and not is_token_dependent(ctx.ax(k))):
        q, rows = ax.points_to
        if q is None and isinstance(k, int) and k > 0 and rows % k == 0:
            return replace(ax, points_to=(None, rows // k))
    if any(isinstance(a, TokenDim) and a.points_to is not None for _, a in token_inputs(node, ctx)):
        fail(node, "divides positions of rows by something other than a whole number of rows per token")
    return rule_pointwise(node, ctx)


@register("pointwise", aten.view.dtype)
def rule_same(node, ctx):
    ins = token_inputs(node, ctx)
    return ins[0][1] if ins else SHARED
