"""Token-local regions: a sort of the batch's rows, per-row work in the sorted order, and the
inverse permutation, as transformers' default (grouped_mm) experts do:

    ids_g, perm = sort(expert_ids)             each ubatch sorts its own rows   (order P)
    x_g = x[perm // top_k]; w_g = w[perm]      rows in P's order                (indexing.py)
    offs = cumsum(histc(ids_g))                per-ubatch counts of P's keys    Groups(P)
    y_g = grouped_mm(x_g, W, offs)             row i uses the group of its own key
    inv[perm] = arange(n); y = y_g[inv]        back in token order              (indexing.py)

Why the split program equals the unsplit one: a value in a sort's order is only ever read row by
row (the rules of every other family keep `order` and refuse to pair such rows with token-ordered
ones, to reduce or to shift along them, or to send them), so each row computes the same function
of its own token wherever the sort put it; the positions a sort returns are only used to index
(each ubatch numbers its own rows from 0, and indexes its own rows with them); a grouped matmul
over rows sorted ascending by key, with offsets counted from those keys, gives row i the group of
its own key. Only the inverse (or an index_put/index_add at the positions) gives token-ordered rows
again; a graph output, a collective or a cross-row op reached by anything else is refused.
Assumed, as transformers does: no key lies below histc's `min` (expert ids from topk are >= 0);
keys above `max` sort to the tail and are skipped, by both programs alike.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from tbo_compiler.passes.token_axis.helpers import fail, rank, shape, tensor_args
from tbo_compiler.passes.token_axis.lattice import Groups, TokenDim, is_token_dependent
from tbo_compiler.passes.token_axis.reduction import dim_rule
from tbo_compiler.passes.token_axis.registry import register, register_named

aten = torch.ops.aten
_SORTS = (aten.sort.default, aten.sort.stable)


def _descending(node) -> bool:
    if node.target in (aten.sort.default, aten.argsort.default) and len(node.args) > 2:
        return bool(node.args[2])
    return bool(node.kwargs.get("descending", False))


def sort_rows(node, ctx, ax: TokenDim):
    """sort/argsort over the token axis of a 1-D tensor: the indices are positions of its rows (in
    the input's order) laid out in a new order, this node's; the values are the sorted keys. Sorting
    a permutation's positions gives its inverse, in the order the positions point into."""
    if rank(node) != 1 or ax.outer != 1:
        fail(node, "sorts over the token axis of a tensor with other axes, or of several ranks' rows "
                   "(mixes tokens)")
    rows = ax.inner
    if ax.points_to is not None:
        into, of = ax.points_to
        if of != rows or _descending(node):
            fail(node, "sorts positions that do not number every row once (mixes tokens)")
        order, values = into, TokenDim(0, 1, rows, order=into, points_to=(into, rows))
    else:
        order = node.name
        values = TokenDim(0, 1, rows, order=order, keys_of=None if _descending(node) else order)
    indices = TokenDim(0, 1, rows, order=order, points_to=(ax.order, rows))
    return (values, indices) if node.target in _SORTS else indices


for _op, _pos in ((aten.sort.default, 1), (aten.sort.stable, 99), (aten.argsort.default, 1),
                  (aten.argsort.stable, 99)):
    register("reduction", _op, reads_order=True, keeps_keys=True)(dim_rule(_pos, -1, False, over_tokens=sort_rows))

_cumsum = dim_rule(1, None, False)


@register("reduction", aten.cumsum.default, reads_order=True)
def rule_cumsum(node, ctx):
    """cumsum of per-ubatch counts of a sort's keys: the offsets of its groups."""
    ax = ctx.ax(node.args[0])
    if isinstance(ax, Groups):
        if ax.kind != "counts" or rank(node) != 1:
            fail(node, f"scans {ax.kind} of sort '{ax.perm}' other than into offsets")
        return Groups(ax.perm, "offsets")
    return _cumsum(node, ctx)


@register("permutation", aten.histc.default, aten.bincount.default)
def rule_count_keys(node, ctx):
    """histc/bincount of a sort's keys (sorted ascending): how many rows of each group the ubatch
    holds -- only a grouped matmul over the rows in that sort's order may read it."""
    ax = ctx.ax(node.args[0])
    name = "histc" if node.target == aten.histc.default else "bincount"
    if not (isinstance(ax, TokenDim) and ax.keys_of is not None):
        fail(node, f"{name} counts over all tokens")
    if node.target == aten.bincount.default and (len(node.args) > 1 and node.args[1] is not None
                                                 or node.kwargs.get("weights") is not None):
        fail(node, "bincount with weights sums over all tokens")
    return Groups(ax.keys_of, "counts")


@register("permutation", aten._grouped_mm.default, reads_order=True)
@register_named("permutation", "transformers::grouped_mm_fallback", reads_order=True)
def rule_grouped_mm(node, ctx):
    """grouped_mm(x [N, K], w [G, K, M], offs): rows offs[g-1]:offs[g] of x times w[g]. Row-wise
    when x's rows are sorted by their group and offs counts the same sort's keys."""
    x, offs = node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    ax = ctx.ax(x)
    if any(is_token_dependent(ctx.ax(a)) for a in tensor_args(node) if a is not x and a is not offs):
        fail(node, "a grouped matmul whose weights carry tokens")
    if not (isinstance(ax, TokenDim) and ax.axis == 0 and ax.outer == 1 and ax.points_to is None
            and len(shape(x)) == 2 and len(shape(node.args[1])) == 3):
        fail(node, "a grouped matmul over anything but [rows, K] x [groups, K, M] (mixes tokens)")
    g = ctx.ax(offs) if isinstance(offs, fx.Node) else None
    if ax.order is None or g != Groups(ax.order, "offsets"):
        fail(node, "a grouped matmul over token rows needs them sorted by group, with offsets counted "
                   "from that sort's keys (each ubatch groups its own rows)")
    return replace(ax, keys_of=None)
