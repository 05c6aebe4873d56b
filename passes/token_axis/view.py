"""View family: reshapes and layout ops (the token axis moves, never scatters), and the ops that
cut or join tensors along other axes (split, cat, stack, repeat, diagonal)."""
from __future__ import annotations

import math

import torch

from tbo_compiler.passes.token_axis.helpers import dim_arg, fail, norm_dim, only_tokendims, rank, require_plain, shape, val
from tbo_compiler.passes.token_axis.lattice import SHARED, TokenDim, is_token_dependent
from tbo_compiler.passes.token_axis.registry import register

aten = torch.ops.aten


def view_map(in_shape, ax: TokenDim, out_shape, T):
    """Mixed-radix match of the token factor across a reshape; None if it is scattered."""
    P = math.prod(in_shape[:ax.axis]) * ax.outer          # flat blocks before the token factor
    S = ax.inner * math.prod(in_shape[ax.axis + 1:])      # flat elements per token
    for j in range(len(out_shape)):
        A, B = math.prod(out_shape[:j]), math.prod(out_shape[j + 1:])
        if A and B and P % A == 0 and S % B == 0 and out_shape[j] == (P // A) * T * (S // B):
            return TokenDim(j, P // A, S // B)
    return None


@register("view", aten.reshape.default, sizes_arg=True)
@register("view", aten.view.default, aten._unsafe_view.default, sizes_arg=True, alias=True)
def rule_view(node, ctx):
    ins = only_tokendims(node, ctx)
    if not ins:
        return SHARED
    src, ax = ins[0]
    m = view_map(shape(src), ax, shape(node), ctx.T)
    if m is None:
        fail(node, f"view {list(shape(src))} -> {list(shape(node))} scatters the token axis")
    if not ax.plain:  # rows in a sort's order: the axis of rows must stay whole, as it is
        if (m.outer, m.inner) != (ax.outer, ax.inner):
            fail(node, f"view {list(shape(src))} -> {list(shape(node))} reshapes rows in the order of "
                       f"sort '{ax.order}'")
        return ax.at(m.axis)
    return m


@register("view", aten.permute.default, alias=True)
def rule_permute(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    dims = [norm_dim(d, len(shape(node))) for d in node.args[1]]
    return ax.at(dims.index(ax.axis))


@register("view", aten.transpose.int, alias=True)
def rule_transpose(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    r = len(shape(node))
    d0, d1 = (norm_dim(d, r) for d in node.args[1:3])
    a = d1 if ax.axis == d0 else d0 if ax.axis == d1 else ax.axis
    return ax.at(a)


@register("view", aten.t.default, alias=True)
def rule_t(node, ctx):
    ax = ctx.ax(node.args[0])
    if isinstance(ax, TokenDim) and len(shape(node)) == 2:
        return ax.at(1 - ax.axis)
    return ax


@register("view", aten.unsqueeze.default, alias=True)
def rule_unsqueeze(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    d = norm_dim(node.args[1], len(shape(node)))
    return ax.at(ax.axis + (1 if d <= ax.axis else 0))


@register("view", aten.squeeze.dims, aten.squeeze.default)
@register("view", aten.squeeze.dim, alias=True)
def rule_squeeze(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    ins = shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None:
        gone = {i for i, s in enumerate(ins) if s == 1}
    else:
        dims = [dims] if isinstance(dims, int) else dims
        gone = {norm_dim(d, len(ins)) for d in dims if ins[norm_dim(d, len(ins))] == 1}
    if ax.axis in gone:
        fail(node, "squeezes the token axis")
    return ax.at(ax.axis - sum(1 for d in gone if d < ax.axis))


@register("view", aten.expand.default, sizes_arg=True, alias=True)
def rule_expand(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    return ax.at(ax.axis + len(shape(node)) - len(shape(node.args[0])))


@register("view", aten.slice.Tensor, alias=True)
def rule_slice(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(shape(node.args[0])))
    if dim == ax.axis and shape(node)[dim] != shape(node.args[0])[dim]:
        fail(node, "slices a subset of the tokens")
    return ax


@register("view", aten.select.int, alias=True)
def rule_select(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    dim = norm_dim(node.args[1], len(shape(node.args[0])))
    if dim == ax.axis:
        fail(node, "selects one token")
    return ax.at(ax.axis - (1 if dim < ax.axis else 0))


@register("view", aten.diagonal.default)
def rule_diagonal(node, ctx):  # diagonal(x, offset, dim1, dim2): both dims removed, diag appended
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    r = rank(node)
    d1 = norm_dim(node.args[2] if len(node.args) > 2 else 0, r)
    d2 = norm_dim(node.args[3] if len(node.args) > 3 else 1, r)
    if ax.axis in (d1, d2):
        fail(node, "takes a diagonal across the token axis")
    return ax.at(ax.axis - sum(1 for d in (d1, d2) if d < ax.axis))


@register("view", aten.repeat.default)
def rule_repeat(node, ctx):  # repeat(x, repeats): tiles; new leading dims when len(repeats) > rank
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    reps = list(node.args[1])
    a = ax.axis + len(reps) - rank(node)
    if reps[a] != 1:
        require_plain(node, node.args[0], ax, "tiles the token axis of")
    return TokenDim(a, ax.outer * reps[a], ax.inner)


def _cat_inputs(node, ctx):
    """The token layout shared by every token input of cat/stack (or SHARED), the inputs (torch.cat
    skips legacy empty [0] tensors: an empty cache) and the shared ones among them."""
    tensors = [t for t in node.args[0] if not (val(t) is not None and val(t).numel() == 0 and val(t).dim() == 1)]
    axes = [ctx.ax(t) for t in tensors]
    dep = [a for a in axes if is_token_dependent(a)]
    if not dep:
        return SHARED, tensors, []
    if any(not isinstance(a, TokenDim) for a in dep) or len(set(a.at(a.axis) for a in dep)) != 1:
        fail(node, "concatenates tensors with different token axes, or values that are not token rows")
    return dep[0].at(dep[0].axis), tensors, [t for t, a in zip(tensors, axes) if not is_token_dependent(a)]


def _align_cat(node, ctx, ax, shared):
    """A shared input is as long as the tokens on their axis (cat and stack need equal sizes
    there): each ubatch takes its rows of it, as matmul does (GPT-OSS's sinks, expanded to the batch)."""
    for t in shared:
        ctx.align(node, t, ax)


@register("view", aten.cat.default)
def rule_cat(node, ctx):
    ax, tensors, shared = _cat_inputs(node, ctx)
    if not isinstance(ax, TokenDim):
        return ax
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if norm_dim(dim, len(shape(tensors[0]))) == ax.axis:
        fail(node, "concatenates along the token axis")
    _align_cat(node, ctx, ax, shared)
    return ax


@register("view", aten.stack.default)
def rule_stack(node, ctx):  # stack inserts a new axis: it never runs along the token axis
    ax, _, shared = _cat_inputs(node, ctx)
    if not isinstance(ax, TokenDim):
        return ax
    _align_cat(node, ctx, ax, shared)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = norm_dim(dim, len(shape(node)))
    return ax.at(ax.axis + (1 if dim <= ax.axis else 0))


def _split_blocks(node, ctx, ax):
    """A split along the token axis into whole outer blocks (the [W*T] rows of an all_gather, one
    piece per rank, as DTensor's gather along another dim does): each piece holds every token."""
    block = ax.size(ctx.T) // ax.outer
    sizes = [int(v.shape[ax.axis]) for v in node.meta["val"]]
    if node.target == aten.unbind.int or any(s % block or s == 0 for s in sizes):
        fail(node, "splits along the token axis")
    require_plain(node, node.args[0], ax, "splits")
    return tuple(TokenDim(ax.axis, s // block, ax.inner) for s in sizes)


@register("view", aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default)
def rule_split(node, ctx):  # split / split_with_sizes / unbind / chunk -> tuple
    ax = ctx.ax(node.args[0])
    n = len(node.meta["val"])
    if not isinstance(ax, TokenDim):
        return tuple(ax for _ in range(n))
    dim = dim_arg(node, 2 if node.target != aten.unbind.int else 1, 0)
    dim = norm_dim(dim, len(shape(node.args[0])))
    if dim == ax.axis:
        return _split_blocks(node, ctx, ax)
    if node.target == aten.unbind.int:
        ax = ax.at(ax.axis - (1 if dim < ax.axis else 0))
    return tuple(ax for _ in range(n))
