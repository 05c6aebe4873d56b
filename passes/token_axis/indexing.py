"""Indexing family: reads by index (index, index_select, embedding, gather) and writes by index
(scatter, index_put, slice_scatter). Token-indexed writes into a shared tensor give STATE."""
from __future__ import annotations

import torch
import torch.fx as fx

from tbo_compiler.passes.token_axis.helpers import align_shared, fail, norm_dim, rank, shape, tensor_args
from tbo_compiler.passes.token_axis.lattice import SHARED, STATE, TokenDim, is_token_dependent
from tbo_compiler.passes.token_axis.registry import register

aten = torch.ops.aten


@register("indexing", aten.index.Tensor, reads_state=True)
def rule_index(node, ctx):  # index.Tensor(x, [idx...])
    x, idx = node.args[0], node.args[1]
    axx = ctx.ax(x)
    idx_axes = [(i, ctx.ax(t)) for i, t in enumerate(idx) if isinstance(t, fx.Node)]
    tok_idx = [(i, a) for i, a in idx_axes if is_token_dependent(a)]
    if axx is STATE or axx is SHARED:
        if not tok_idx:
            return SHARED
        # x[..., idx_T..., ...]: the indexed dims are replaced by the index shape
        i, a = tok_idx[0]
        if not isinstance(a, TokenDim):
            fail(node, "indexes with a non token-major tensor")
        first = min(j for j, _ in idx_axes)
        contiguous = all(isinstance(idx[j], fx.Node) for j in range(first, max(j for j, _ in idx_axes) + 1))
        lead = first if contiguous else 0
        return TokenDim(lead + a.axis, a.outer, a.inner)
    if isinstance(axx, TokenDim):
        if any(j == axx.axis for j, _ in idx_axes):
            fail(node, "indexes along the token axis (picks or reorders tokens)")
        if tok_idx:
            fail(node, "token tensor indexed by another token tensor")
        if any(j < axx.axis for j, _ in idx_axes):
            fail(node, "advanced indexing before the token axis moves it")
        return axx
    fail(node, f"indexes a {axx} value")


@register("indexing", aten.index_select.default, aten.embedding.default, reads_state=True)
def rule_index_select(node, ctx):  # index_select(x, dim, index) / embedding(weight, ids)
    if node.target == aten.embedding.default:
        w, ids = node.args[0], node.args[1]
        a = ctx.ax(ids)
        if is_token_dependent(ctx.ax(w)):
            fail(node, "embedding table carries tokens")
        return a if isinstance(a, TokenDim) or a is SHARED else fail(node, "bad ids")
    x, dim, index = node.args[:3]
    axx, axi = ctx.ax(x), ctx.ax(index)
    dim = norm_dim(dim, len(shape(x)))
    if isinstance(axx, TokenDim):
        if dim == axx.axis or is_token_dependent(axi):
            fail(node, "index_select along the token axis")
        return axx
    if isinstance(axi, TokenDim):
        return TokenDim(dim, axi.outer, axi.inner)
    return SHARED


@register("indexing", aten.gather.default, reads_state=True)
def rule_gather(node, ctx):  # gather(x, dim, index): out has index's shape
    x, dim, index = node.args[:3]
    axx, axi = ctx.ax(x), ctx.ax(index)
    dim = norm_dim(dim, len(shape(x)))
    a = axx if isinstance(axx, TokenDim) else axi
    if isinstance(a, TokenDim):
        if dim == a.axis:
            fail(node, "gathers along the token axis")
        if isinstance(axi, TokenDim) and axi != a:
            fail(node, "index has its tokens laid out differently")
        align_shared(node, ctx, a, (0, 2))
        return a
    return SHARED


@register("indexing", aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.index_put.default,
          aten.index_put_.default, aten.index_copy.default, aten.index_add.default, aten.scatter_reduce.two,
          reads_state=True, writes_rows=True)
def rule_scatter(node, ctx):  # scatter / scatter_add / index_put / index_copy / index_add
    self_ax = ctx.ax(node.args[0])
    others = [ctx.ax(a) for a in tensor_args(node)[1:]]
    if isinstance(self_ax, TokenDim):
        if node.target in (aten.index_put.default, aten.index_put_.default):
            idx = node.args[1]
            if any(isinstance(t, fx.Node) and j == self_ax.axis for j, t in enumerate(idx)):
                fail(node, "writes along the token axis")
        else:
            dim = norm_dim(node.args[1], len(shape(node.args[0])))
            if dim == self_ax.axis:
                fail(node, "scatters along the token axis")
            align_shared(node, ctx, self_ax, (2, 3))
        return self_ax
    if any(is_token_dependent(o) for o in others) or self_ax is STATE:
        return STATE  # token-indexed rows written into a shared tensor (a KV cache)
    return SHARED


@register("indexing", aten.slice_scatter.default, aten.select_scatter.default)
def rule_slice_scatter(node, ctx):  # slice_scatter(x, src, dim, ...) / select_scatter(x, src, dim, i)
    ax, src = ctx.ax(node.args[0]), ctx.ax(node.args[1])
    dim = norm_dim(node.args[2] if len(node.args) > 2 else 0, rank(node))
    if not isinstance(ax, TokenDim):
        if not is_token_dependent(src):
            return ax
        if not isinstance(src, TokenDim):
            fail(node, f"source is {src}")
        # a shared buffer (new_empty(B, ..)) filled with token rows: its rows pair with the tokens
        k = src.axis + (1 if node.target == aten.select_scatter.default and dim <= src.axis else 0)
        if k == dim or shape(node.args[0])[k] != shape(node.args[1])[src.axis]:
            fail(node, "writes token rows into a part of a shared tensor")
        out = TokenDim(k, src.outer, src.inner)
        ctx.align(node, node.args[0], out)
        return out
    if dim == ax.axis:
        fail(node, "writes a part of the token axis")
    want = ax
    if node.target == aten.select_scatter.default:
        want = TokenDim(ax.axis - (1 if dim < ax.axis else 0), ax.outer, ax.inner)
    if is_token_dependent(src) and src != want:
        fail(node, f"source has its tokens laid out differently ({src} vs {want})")
    return ax
