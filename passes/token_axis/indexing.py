"""Indexing family: reads by index (index, index_select, embedding, gather) and writes by index
(scatter, index_put, slice_scatter). Token-indexed writes into a shared tensor give STATE.

Along the token axis only by positions of rows (a sort's indices, their inverse: lattice.py), which
each ubatch numbers from 0 over its own rows: x[perm] puts x's rows in the sort's order,
y[inverse] or out[perm] = y (index_put, index_add) puts them back; and by a mask of the tokens
with a scalar (x[mask] = 0), which writes each row by its own bit."""
from __future__ import annotations

import torch
import torch.fx as fx

from tbo_compiler.passes.token_axis.helpers import align_shared, fail, norm_dim, rank, shape, tensor_args, val
from tbo_compiler.passes.token_axis.lattice import SHARED, STATE, TokenDim, is_order_local, is_token_dependent
from tbo_compiler.passes.token_axis.registry import register

aten = torch.ops.aten


def _one_index(node, idx, what):
    tensors = [(j, t) for j, t in enumerate(idx) if isinstance(t, fx.Node)]
    if len(tensors) != 1:
        fail(node, f"{what} along the token axis with several index tensors")
    return tensors[0]


def _gather_rows(node, ctx, axx, idx):
    """x[.., positions, ..] along the token axis: x's rows in the positions' order."""
    j, t = _one_index(node, idx, "indexes")
    a = ctx.ax(t)
    if not (isinstance(a, TokenDim) and a.points_to == (axx.order, axx.inner) and axx.outer == 1
            and a.outer == 1 and rank(node, 0) >= 1 and len(shape(t)) == 1):
        fail(node, "indexes along the token axis (picks or reorders tokens)")
    return TokenDim(j + a.axis, 1, a.inner, order=a.order, points_to=axx.points_to)


@register("indexing", aten.index.Tensor, reads_state=True, reads_order=True)
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
        if any(isinstance(b, TokenDim) and b.points_to is not None for _, b in tok_idx):
            fail(node, "indexes a shared tensor with positions of rows (each ubatch numbers its own from 0)")
        first = min(j for j, _ in idx_axes)
        contiguous = all(isinstance(idx[j], fx.Node) for j in range(first, max(j for j, _ in idx_axes) + 1))
        lead = first if contiguous else 0
        return a.at(lead + a.axis)
    if isinstance(axx, TokenDim):
        if any(j == axx.axis for j, _ in idx_axes):
            return _gather_rows(node, ctx, axx, idx)
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
        return a.at(a.axis) if isinstance(a, TokenDim) else a if a is SHARED else fail(node, "bad ids")
    x, dim, index = node.args[:3]
    axx, axi = ctx.ax(x), ctx.ax(index)
    dim = norm_dim(dim, len(shape(x)))
    if isinstance(axx, TokenDim):
        if dim == axx.axis or is_token_dependent(axi):
            fail(node, "index_select along the token axis")
        return axx
    if isinstance(axi, TokenDim):
        return axi.at(dim)
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


_INDEX_PUTS = (aten.index_put.default, aten.index_put_.default)
_INDEX_ADDS = (aten.index_add.default, aten.index_copy.default)


def _write_args(node):
    """(dim, index, values, accumulate) of an index_put / index_add / index_copy writing along one
    dim with one index tensor, or None (a scatter, or several index tensors)."""
    if node.target in _INDEX_PUTS:
        idx = [(j, t) for j, t in enumerate(node.args[1]) if isinstance(t, fx.Node)]
        if len(idx) != 1:
            return None
        acc = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        return idx[0][0], idx[0][1], node.args[2], bool(acc)
    if node.target in _INDEX_ADDS:
        dim = norm_dim(node.args[1], rank(node))
        return dim, node.args[2], node.args[3], node.target == aten.index_add.default
    return None


def _iota(n, length: int) -> bool:
    """n is arange(length) (0, 1, .., length - 1)."""
    if not isinstance(n, fx.Node):
        return False
    a = n.args
    if n.target == aten.arange.default:
        return a[0] == length
    if n.target in (aten.arange.start, aten.arange.start_step):
        return a[0] == 0 and a[1] == length and (len(a) < 3 or a[2] == 1)
    if n.target == torch.ops.prims.iota.default:  # what arange is in Inductor's post-grad graph
        return a[0] == length and n.kwargs.get("start") == 0 and n.kwargs.get("step") == 1
    return False


def _write_mask(node, ctx, self_ax, j, mask, values):
    """x[mask] = scalar with a boolean mask of the token rows: each row written by its own bit."""
    m = ctx.ax(mask)
    k = len(shape(mask))
    if not (node.target in _INDEX_PUTS and isinstance(m, TokenDim) and m.order == self_ax.order
            and m.points_to is None and m.outer == self_ax.outer and j + m.axis == self_ax.axis
            and shape(mask) == shape(node.args[0])[j:j + k]):
        fail(node, "writes along the token axis with a mask that is not one bit per token row")
    v = val(values)
    if is_token_dependent(ctx.ax(values)) or not isinstance(v, torch.Tensor) or v.numel() != 1:
        fail(node, "writes the masked token rows from a tensor consumed in order across tokens")
    return self_ax.at(self_ax.axis)


def _write_rows(node, ctx, self_ax, j, index, values, accumulate):
    """x[.., positions, ..] = values (or +=) along the token axis: each ubatch writes its own rows.
    A write at every position (a permutation) needs no base rows: `inv[perm] = arange` is the
    inverse permutation; `out[perm] = y` and `out.index_add_(0, perm // k, y)` put y back in
    the order the positions point into."""
    base = node.args[0]
    a = ctx.ax(index)
    if val(index) is not None and val(index).dtype == torch.bool:
        if not isinstance(self_ax, TokenDim):
            fail(node, "writes into a shared tensor with a mask of the tokens")
        return _write_mask(node, ctx, self_ax, j, index, values)
    if not (isinstance(a, TokenDim) and a.points_to is not None and a.outer == 1 and len(shape(index)) == 1):
        fail(node, "writes along the token axis (at positions that do not number the tokens' rows)")
    order, rows = a.points_to
    if isinstance(self_ax, TokenDim):
        if (self_ax.axis, self_ax.outer, self_ax.inner) != (j, 1, rows) or self_ax.points_to is not None:
            fail(node, f"writes at positions of {rows} rows per token into {base.name} laid out as {self_ax}")
    elif shape(base)[j] != rows * ctx.T:
        fail(node, f"writes at positions of {rows} rows per token into shared {base.name} of another length")
    whole = a.inner == rows and not accumulate  # every row written once: the base's rows do not matter
    v = ctx.ax(values) if isinstance(values, fx.Node) else SHARED
    if _iota(values, a.size(ctx.T)) and whole and rank(node) == 1:
        ctx.renumber(node, values, TokenDim(0, 1, a.inner))
        points = (a.order, a.inner)   # inverse[perm[i]] = i: where each row went
    elif (isinstance(v, TokenDim) and (v.axis, v.outer, v.inner, v.order) == (j, 1, a.inner, a.order)
          and v.points_to is None):
        points = None
    else:
        fail(node, "writes values that are not the rows its positions number")
    if not whole and not (self_ax.order == order if isinstance(self_ax, TokenDim) else order is None):
        fail(node, f"adds rows into {base.name}, whose rows are not in the order the positions point into")
    if not isinstance(self_ax, TokenDim):  # a shared buffer (zeros(T, ..)): each ubatch its rows
        ctx.align(node, base, TokenDim(j, 1, rows))
    return TokenDim(j, 1, rows, order=order, points_to=points)


@register("indexing", aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.index_put.default,
          aten.index_put_.default, aten.index_copy.default, aten.index_add.default, aten.scatter_reduce.two,
          reads_state=True, writes_rows=True, reads_order=True)
def rule_scatter(node, ctx):  # scatter / scatter_add / index_put / index_copy / index_add
    self_ax = ctx.ax(node.args[0])
    others = [ctx.ax(a) for a in tensor_args(node)[1:]]
    w = _write_args(node)
    if w is not None and (isinstance(self_ax, TokenDim) and w[0] == self_ax.axis
                          or not isinstance(self_ax, TokenDim) and self_ax is not STATE
                          and isinstance(ctx.ax(w[1]), TokenDim) and ctx.ax(w[1]).points_to is not None):
        return _write_rows(node, ctx, self_ax, *w)
    if is_order_local(self_ax) or any(is_order_local(o) for o in others):
        fail(node, "writes positions of rows or per-ubatch counts (each ubatch numbers and counts its own) "
                   "other than along the token axis they number")
    if isinstance(self_ax, TokenDim):
        if any(isinstance(o, TokenDim) and o.order != self_ax.order for o in others):
            fail(node, "writes rows of one order into rows of another (a sort's order vs token order)")
        if node.target in _INDEX_PUTS:
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
        out = src.at(k)
        ctx.align(node, node.args[0], out)
        return out
    if dim == ax.axis:
        fail(node, "writes a part of the token axis")
    want = ax
    if node.target == aten.select_scatter.default:
        want = ax.at(ax.axis - (1 if dim < ax.axis else 0))
    if is_token_dependent(src) and src != want:
        fail(node, f"source has its tokens laid out differently ({src} vs {want})")
    return ax
