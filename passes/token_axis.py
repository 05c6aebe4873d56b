"""Token-axis inference: which axis of each value carries the batch's tokens.

Contract
  requires   a functional ATen graph with meta["val"] on every node, traced at a static token
             count T (T >= 2), and the set of placeholders whose axis 0 is the token axis.
  guarantees a frozen `TokenAxes` record mapping every node to one of
               SHARED               depends on no token (weights, caches read before any write)
               TokenDim(a, o, i)    axis a has size o*T*i laid out as [o][T][i]: o "outer" blocks
                                    (e.g. ranks after an all_gather), i rows per token
               PER_UBATCH           depends on the tokens but has no token axis (a comm handle)
               STATE                a shared tensor updated at token-indexed rows (a KV cache
                                    after index_put): each ubatch updates it in turn
             or raises `TokenAxisError` naming the node and the user's source line where the graph
             cannot be split (an op reducing or sorting over tokens, a token axis that a view
             scatters, an op with no rule).
  must not   change the graph.

Pseudo-code
  Step 1: seed token placeholders with TokenDim(0, 1, 1), every other placeholder SHARED.
  Step 2: in topological order, apply the op's rule to its inputs' axes:
          pointwise (broadcast), views (mixed-radix match), layout ops, reductions and
          dim-ops (the token axis must not be the op's dim), matmuls (token not contracted),
          indexing and scatters (token-indexed writes into shared tensors give STATE),
          tbo kernels (row-wise), comm ops (outer *= W or /= W), getitem.
  Step 3: return the record.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from tbo_compiler.ops.comm import START_OPS, TOKEN_BLOCKS, WAIT_OPS, group_world
from tbo_compiler.ops.errors import TokenAxisError, node_error
from tbo_compiler.ops.kernels import FAN_OUT_OPS, ROWWISE_OPS

aten = torch.ops.aten


@dataclass(frozen=True)
class TokenDim:
    axis: int
    outer: int = 1
    inner: int = 1

    def size(self, T: int) -> int:
        return self.outer * T * self.inner


class _Tag(str):
    pass


SHARED = _Tag("shared")
PER_UBATCH = _Tag("per_ubatch")
STATE = _Tag("state")
Axis = Any  # TokenDim | SHARED | PER_UBATCH | STATE | tuple[Axis, ...]


def is_token_dependent(a: Axis) -> bool:
    if isinstance(a, tuple):
        return any(is_token_dependent(x) for x in a)
    return a is not SHARED


@dataclass(frozen=True)
class TokenAxes:
    T: int
    axes: dict          # node name -> Axis
    token_inputs: tuple  # placeholder names

    def __getitem__(self, node: fx.Node) -> Axis:
        return self.axes[node.name]



# Step 2 helpers ------------------------------------------------------------------------------

def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _shape(n) -> tuple[int, ...]:
    v = _val(n)
    return tuple(int(s) for s in v.shape)


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


class _Ctx:
    def __init__(self, axes: dict, T: int):
        self.axes, self.T = axes, T

    def ax(self, a):
        if isinstance(a, fx.Node):
            return self.axes[a.name]
        if isinstance(a, (list, tuple)):
            found = [self.ax(x) for x in a]
            dep = [x for x in found if is_token_dependent(x)]
            return dep[0] if dep else SHARED
        return SHARED


Rule = Callable[[fx.Node, _Ctx], Axis]
_RULES: dict[Any, Rule] = {}


def register_rule(target, rule: Rule) -> None:
    """Teach the pass an op: `rule(node, ctx) -> Axis` (see the module docstring for the values)."""
    _RULES[target] = rule


def _tensor_args(node: fx.Node):
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
    return out


def _token_inputs(node, ctx):
    return [(a, ctx.ax(a)) for a in _tensor_args(node) if is_token_dependent(ctx.ax(a))]


def _fail(node, why: str):
    raise node_error(TokenAxisError, node, why)


def _only_tokendims(node, ctx):
    ins = _token_inputs(node, ctx)
    for a, ax in ins:
        if ax is STATE or ax is PER_UBATCH or isinstance(ax, tuple):
            _fail(node, f"input {a.name} is {ax if not isinstance(ax, tuple) else 'a tuple'}, not a "
                        "token-major tensor")
    return ins


# pointwise with broadcasting
def _rule_pointwise(node, ctx):
    ins = _only_tokendims(node, ctx)
    if not ins:
        return SHARED
    out_shape = _shape(node)
    r = len(out_shape)
    result = None
    for a, ax in ins:
        oa = ax.axis + (r - len(_shape(a)))
        if _shape(a)[ax.axis] != out_shape[oa]:
            _fail(node, f"token axis of {a.name} is broadcast")
        cand = TokenDim(oa, ax.outer, ax.inner)
        if result is not None and result != cand:
            _fail(node, f"inputs put tokens on different axes ({result} vs {cand})")
        result = cand
    # a shared input with a full-size dim at the token axis would need slicing too
    for a in _tensor_args(node):
        if not is_token_dependent(ctx.ax(a)) and _val(a) is not None and hasattr(_val(a), "shape"):
            s = _shape(a)
            k = result.axis - (r - len(s))
            if 0 <= k < len(s) and s[k] == out_shape[result.axis] and s[k] != 1:
                _fail(node, f"shared tensor {a.name} {list(s)} lines up with the token axis; "
                            "build it from a token input (e.g. zeros_like) so it splits too")
    return result


def _view_map(in_shape, ax: TokenDim, out_shape, T):
    """Mixed-radix match of the token factor across a reshape; None if it is scattered."""
    P = math.prod(in_shape[:ax.axis]) * ax.outer          # flat blocks before the token factor
    S = ax.inner * math.prod(in_shape[ax.axis + 1:])      # flat elements per token
    for j in range(len(out_shape)):
        A, B = math.prod(out_shape[:j]), math.prod(out_shape[j + 1:])
        if A and B and P % A == 0 and S % B == 0 and out_shape[j] == (P // A) * T * (S // B):
            return TokenDim(j, P // A, S // B)
    return None


def _rule_view(node, ctx):
    ins = _only_tokendims(node, ctx)
    if not ins:
        return SHARED
    src, ax = ins[0]
    m = _view_map(_shape(src), ax, _shape(node), ctx.T)
    if m is None:
        _fail(node, f"view {list(_shape(src))} -> {list(_shape(node))} scatters the token axis")
    return m


def _rule_same(node, ctx):
    ins = _token_inputs(node, ctx)
    return ins[0][1] if ins else SHARED


def _rule_permute(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    dims = [_norm_dim(d, len(_shape(node))) for d in node.args[1]]
    return TokenDim(dims.index(ax.axis), ax.outer, ax.inner)


def _rule_transpose(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    r = len(_shape(node))
    d0, d1 = (_norm_dim(d, r) for d in node.args[1:3])
    a = d1 if ax.axis == d0 else d0 if ax.axis == d1 else ax.axis
    return TokenDim(a, ax.outer, ax.inner)


def _rule_t(node, ctx):
    ax = ctx.ax(node.args[0])
    if isinstance(ax, TokenDim) and len(_shape(node)) == 2:
        return TokenDim(1 - ax.axis, ax.outer, ax.inner)
    return ax


def _rule_unsqueeze(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    d = _norm_dim(node.args[1], len(_shape(node)))
    return TokenDim(ax.axis + (1 if d <= ax.axis else 0), ax.outer, ax.inner)


def _rule_squeeze(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    ins = _shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None:
        gone = {i for i, s in enumerate(ins) if s == 1}
    else:
        dims = [dims] if isinstance(dims, int) else dims
        gone = {_norm_dim(d, len(ins)) for d in dims if ins[_norm_dim(d, len(ins))] == 1}
    if ax.axis in gone:
        _fail(node, "squeezes the token axis")
    return TokenDim(ax.axis - sum(1 for d in gone if d < ax.axis), ax.outer, ax.inner)


def _rule_expand(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    return TokenDim(ax.axis + len(_shape(node)) - len(_shape(node.args[0])), ax.outer, ax.inner)


def _rule_slice(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(_shape(node.args[0])))
    if dim == ax.axis and _shape(node)[dim] != _shape(node.args[0])[dim]:
        _fail(node, "slices a subset of the tokens")
    return ax


def _rule_select(node, ctx):
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    dim = _norm_dim(node.args[1], len(_shape(node.args[0])))
    if dim == ax.axis:
        _fail(node, "selects one token")
    return TokenDim(ax.axis - (1 if dim < ax.axis else 0), ax.outer, ax.inner)


def _dim_arg(node, pos, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get("dim", default)


def _make_dim_rule(pos: int, default, removes: bool):
    """Ops over `dim` (softmax, topk, sort, cumsum, reductions): tokens must not be on it."""

    def rule(node, ctx):
        ax = ctx.ax(node.args[0])
        if not isinstance(ax, TokenDim):
            if ax is SHARED:
                return tuple(SHARED for _ in node.meta["val"]) if isinstance(node.meta.get("val"), (tuple, list)) else SHARED
            _fail(node, f"input is {ax}")
        rank = len(_shape(node.args[0]))
        dims = _dim_arg(node, pos, default)
        if dims is None:
            dims = list(range(rank))
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [_norm_dim(d, rank) for d in dims] if rank else []
        if ax.axis in dims:
            _fail(node, "reduces, sorts or scans over the token axis (mixes tokens)")
        keep = node.kwargs.get("keepdim", node.args[pos + 1] if len(node.args) > pos + 1 and
                               isinstance(node.args[pos + 1], bool) else False)
        a = ax.axis
        if removes and not keep:
            a -= sum(1 for d in dims if d < ax.axis)
        out = TokenDim(a, ax.outer, ax.inner)
        v = node.meta.get("val")
        return tuple(out for _ in v) if isinstance(v, (tuple, list)) else out

    return rule


def _rule_mm(node, ctx):  # mm(a[M,K], b[K,N]); addmm(bias, a, b)
    off = 1 if node.target == aten.addmm.default else 0
    a, b = node.args[off], node.args[off + 1]
    axa, axb = ctx.ax(a), ctx.ax(b)
    if off and is_token_dependent(ctx.ax(node.args[0])) and not is_token_dependent(axa):
        _fail(node, "bias carries tokens")
    if isinstance(axa, TokenDim) and axa.axis == 0 and not is_token_dependent(axb):
        return axa
    if isinstance(axb, TokenDim) and axb.axis == 1 and not is_token_dependent(axa):
        return axb
    if not is_token_dependent(axa) and not is_token_dependent(axb):
        return SHARED
    _fail(node, "contracts over the token axis or multiplies two token tensors (mixes tokens)")


def _rule_bmm(node, ctx):  # bmm(a[B,M,K], b[B,K,N])
    a, b = node.args[0], node.args[1]
    axa, axb = ctx.ax(a), ctx.ax(b)
    if isinstance(axa, TokenDim) and isinstance(axb, TokenDim) and axa.axis == 0 and axb.axis == 0 and axa == axb:
        return axa
    if isinstance(axa, TokenDim) and axa.axis in (0, 1) and not is_token_dependent(axb):
        return axa
    if isinstance(axb, TokenDim) and axb.axis in (0, 2) and not is_token_dependent(axa):
        return axb if axb.axis == 0 else TokenDim(2, axb.outer, axb.inner)
    if not is_token_dependent(axa) and not is_token_dependent(axb):
        return SHARED
    _fail(node, "batched matmul mixes tokens")


def _rule_index(node, ctx):  # index.Tensor(x, [idx...])
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
            _fail(node, "indexes with a non token-major tensor")
        first = min(j for j, _ in idx_axes)
        contiguous = all(isinstance(idx[j], fx.Node) for j in range(first, max(j for j, _ in idx_axes) + 1))
        lead = first if contiguous else 0
        return TokenDim(lead + a.axis, a.outer, a.inner)
    if isinstance(axx, TokenDim):
        if any(j == axx.axis for j, _ in idx_axes):
            _fail(node, "indexes along the token axis (picks or reorders tokens)")
        if tok_idx:
            _fail(node, "token tensor indexed by another token tensor")
        if any(j < axx.axis for j, _ in idx_axes):
            _fail(node, "advanced indexing before the token axis moves it")
        return axx
    _fail(node, f"indexes a {axx} value")


def _rule_index_select(node, ctx):  # index_select(x, dim, index) / embedding(weight, ids)
    if node.target == aten.embedding.default:
        w, ids = node.args[0], node.args[1]
        a = ctx.ax(ids)
        if is_token_dependent(ctx.ax(w)):
            _fail(node, "embedding table carries tokens")
        return a if isinstance(a, TokenDim) or a is SHARED else _fail(node, "bad ids")
    x, dim, index = node.args[:3]
    axx, axi = ctx.ax(x), ctx.ax(index)
    dim = _norm_dim(dim, len(_shape(x)))
    if isinstance(axx, TokenDim):
        if dim == axx.axis or is_token_dependent(axi):
            _fail(node, "index_select along the token axis")
        return axx
    if isinstance(axi, TokenDim):
        return TokenDim(dim, axi.outer, axi.inner)
    return SHARED


def _rule_gather(node, ctx):  # gather(x, dim, index): out has index's shape
    x, dim, index = node.args[:3]
    axx, axi = ctx.ax(x), ctx.ax(index)
    dim = _norm_dim(dim, len(_shape(x)))
    a = axx if isinstance(axx, TokenDim) else axi
    if isinstance(a, TokenDim):
        if dim == a.axis:
            _fail(node, "gathers along the token axis")
        return a
    return SHARED


def _rule_scatter(node, ctx):  # scatter / scatter_add / index_put / index_copy / index_add
    self_ax = ctx.ax(node.args[0])
    others = [ctx.ax(a) for a in _tensor_args(node)[1:]]
    if isinstance(self_ax, TokenDim):
        if node.target in (aten.index_put.default, aten.index_put_.default):
            idx = node.args[1]
            if any(isinstance(t, fx.Node) and j == self_ax.axis for j, t in enumerate(idx)):
                _fail(node, "writes along the token axis")
        else:
            dim = _norm_dim(node.args[1], len(_shape(node.args[0])))
            if dim == self_ax.axis:
                _fail(node, "scatters along the token axis")
        return self_ax
    if any(is_token_dependent(o) for o in others) or self_ax is STATE:
        return STATE  # token-indexed rows written into a shared tensor (a KV cache)
    return SHARED


def _rule_cat(node, ctx):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    axes = [ctx.ax(t) for t in tensors]
    dep = [a for a in axes if is_token_dependent(a)]
    if not dep:
        return SHARED
    if any(not isinstance(a, TokenDim) for a in dep) or len(dep) != len(axes) or len(set(dep)) != 1:
        _fail(node, "concatenates token and shared tensors, or tensors with different token axes")
    ax = dep[0]
    if _norm_dim(dim, len(_shape(tensors[0]))) == ax.axis:
        _fail(node, "concatenates along the token axis")
    return ax


def _rule_stack(node, ctx):
    ax = _rule_cat(node, ctx)
    if not isinstance(ax, TokenDim):
        return ax
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(_shape(node)))
    return TokenDim(ax.axis + (1 if dim <= ax.axis else 0), ax.outer, ax.inner)


def _rule_split(node, ctx):  # split / split_with_sizes / unbind / chunk -> tuple
    ax = ctx.ax(node.args[0])
    n = len(node.meta["val"])
    if not isinstance(ax, TokenDim):
        return tuple(ax for _ in range(n))
    dim = _dim_arg(node, 2 if node.target != aten.unbind.int else 1, 0)
    dim = _norm_dim(dim, len(_shape(node.args[0])))
    if dim == ax.axis:
        _fail(node, "splits along the token axis")
    if node.target == aten.unbind.int:
        ax = TokenDim(ax.axis - (1 if dim < ax.axis else 0), ax.outer, ax.inner)
    return tuple(ax for _ in range(n))


def _rule_factory(node, ctx):
    """Factories and new_*(x, size): no data from tokens. A token-sized result made this way is
    caught where it meets a token axis (see _rule_pointwise)."""
    return SHARED


def _rule_getitem(node, ctx):
    ax = ctx.axes[node.args[0].name]
    if isinstance(ax, tuple):
        return ax[node.args[1]]
    return ax


def _rule_rowwise(node, ctx):
    ax = ctx.ax(node.args[0])
    if ax is SHARED:
        return SHARED if not _token_inputs(node, ctx) else _fail(node, "first argument is not token-major")
    if not isinstance(ax, TokenDim) or ax.axis != 0:
        _fail(node, "row-wise kernel needs tokens on axis 0")
    for a, other in _token_inputs(node, ctx):
        if other is not STATE and other != ax:
            _fail(node, f"{a.name} has its tokens laid out differently ({other} vs {ax})")
    return ax


def _rule_comm_start(node, ctx):
    ax = ctx.ax(node.args[0])
    if ax is SHARED:
        return SHARED
    if not isinstance(ax, TokenDim) or ax.axis != 0:
        _fail(node, "communicates a tensor whose tokens are not on axis 0")
    return PER_UBATCH


def _scaled(ax, node, mul=1, div=1):
    if not isinstance(ax, TokenDim) or ax.axis != 0:
        return ax if ax is SHARED else _fail(node, "tokens not on axis 0")
    if (ax.outer * mul) % div:
        _fail(node, f"reduce-scatter of {ax.outer * mul} token blocks over {div} ranks splits tokens")
    return TokenDim(0, ax.outer * mul // div, ax.inner)


def _rule_comm_wait(node, ctx):
    """wait(handle, payload..., group, world): each result holds the blocks TOKEN_BLOCKS says."""
    _, world = group_world(node.args)
    blocks = TOKEN_BLOCKS[WAIT_OPS[node.target]]
    mul, div = {"same": (1, 1), "gather": (world, 1), "scatter": (1, world)}[blocks]
    outs = tuple(_scaled(ctx.ax(a), node, mul=mul, div=div) for a in node.args[1:-2])
    return outs if len(outs) > 1 else outs[0]


def _rule_fan_out(node, ctx):
    """dispatch_pack(x, ...): every output holds `world` blocks of x's tokens."""
    world = node.args[FAN_OUT_OPS[node.target]]
    x = _scaled(ctx.ax(node.args[0]), node, mul=world)
    return (x, x)


# native functional collectives (torch.distributed._functional_collectives)
def _rule_c10d_same(node, ctx):
    return ctx.ax(node.args[0])


def _rule_c10d_all_gather(node, ctx):  # all_gather_into_tensor(x, group_size, group_name)
    ax = ctx.ax(node.args[0])
    return _scaled(ax, node, mul=node.args[1]) if isinstance(ax, TokenDim) and ax.axis == 0 else ax


def _rule_c10d_reduce_scatter(node, ctx):  # reduce_scatter_tensor(x, op, group_size, group_name)
    ax = ctx.ax(node.args[0])
    return _scaled(ax, node, div=node.args[2]) if isinstance(ax, TokenDim) and ax.axis == 0 else ax


def _rule_c10d_a2a(node, ctx):  # all_to_all_single(x, out_splits, in_splits, group_name)
    ax = ctx.ax(node.args[0])
    if isinstance(ax, TokenDim):
        if ax.axis != 0 or ax.outer == 1:
            _fail(node, "all_to_all_single must exchange [ranks x tokens] blocks on axis 0 "
                        "(reshape to [W*T, ...] first)")
    return ax


def _install_rules():
    R = register_rule
    for op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        R(op, _rule_view)
    for op in (aten._to_copy.default, aten.clone.default, aten.alias.default, aten.detach.default,
               aten.contiguous.default, aten.lift_fresh_copy.default, aten.zeros_like.default,
               aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
               aten.rand_like.default, aten.view.dtype, aten.fill.Scalar, aten.copy.default,
               aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.silu.default,
               aten.gelu.default):
        R(op, _rule_pointwise if op not in (aten.view.dtype,) else _rule_same)
    R(aten.permute.default, _rule_permute)
    R(aten.transpose.int, _rule_transpose)
    R(aten.t.default, _rule_t)
    R(aten.unsqueeze.default, _rule_unsqueeze)
    for op in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        R(op, _rule_squeeze)
    R(aten.expand.default, _rule_expand)
    R(aten.slice.Tensor, _rule_slice)
    R(aten.select.int, _rule_select)
    for op, pos, default, removes in (
        (aten.sum.dim_IntList, 1, None, True), (aten.mean.dim, 1, None, True), (aten.amax.default, 1, None, True),
        (aten.amin.default, 1, None, True), (aten.max.dim, 1, None, True), (aten.min.dim, 1, None, True),
        (aten.argmax.default, 1, None, True), (aten.argmin.default, 1, None, True), (aten.any.dim, 1, None, True),
        (aten.any.dims, 1, None, True), (aten.all.dim, 1, None, True), (aten.prod.dim_int, 1, None, True),
        (aten.var_mean.correction, 1, None, True), (aten.logsumexp.default, 1, None, True),
        (aten.sum.default, 99, None, True), (aten.any.default, 99, None, True), (aten.mean.default, 99, None, True),
        (aten._softmax.default, 1, -1, False), (aten._log_softmax.default, 1, -1, False),
        (aten.topk.default, 2, -1, False), (aten.sort.default, 1, -1, False), (aten.sort.stable, 99, -1, False),
        (aten.argsort.default, 1, -1, False), (aten.argsort.stable, 99, -1, False),
        (aten.cumsum.default, 1, None, False), (aten.cumprod.default, 1, None, False),
        (aten.flip.default, 1, None, False), (aten.roll.default, 2, None, False),
    ):
        R(op, _make_dim_rule(pos, default, removes))
    for op in (aten.mm.default, aten.addmm.default):
        R(op, _rule_mm)
    R(aten.bmm.default, _rule_bmm)
    R(aten.index.Tensor, _rule_index)
    R(aten.index_select.default, _rule_index_select)
    R(aten.embedding.default, _rule_index_select)
    R(aten.gather.default, _rule_gather)
    for op in (aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.index_put.default,
               aten.index_put_.default, aten.index_copy.default, aten.index_add.default,
               aten.scatter_reduce.two):
        R(op, _rule_scatter)
    R(aten.cat.default, _rule_cat)
    R(aten.stack.default, _rule_stack)
    for op in (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default):
        R(op, _rule_split)
    for op in (aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
               aten.arange.default, aten.arange.start, aten.arange.start_step, aten.scalar_tensor.default,
               aten.empty_strided.default):
        R(op, _rule_factory)
    for op in (aten.new_zeros.default, aten.new_empty.default, aten.new_full.default, aten.new_ones.default):
        R(op, _rule_factory)
    R(operator.getitem, _rule_getitem)

    for op in ROWWISE_OPS:
        R(op, _rule_rowwise)
    for op in FAN_OUT_OPS:
        R(op, _rule_fan_out)
    for op in START_OPS:
        R(op, _rule_comm_start)
    for op in WAIT_OPS:
        R(op, _rule_comm_wait)

    c10d = torch.ops._c10d_functional
    R(c10d.all_reduce.default, _rule_c10d_same)
    R(c10d.wait_tensor.default, _rule_c10d_same)
    R(c10d.all_gather_into_tensor.default, _rule_c10d_all_gather)
    R(c10d.reduce_scatter_tensor.default, _rule_c10d_reduce_scatter)
    R(c10d.all_to_all_single.default, _rule_c10d_a2a)


_install_rules()  # the built-ins; register_rule adds to them, never replaces them
_READS_STATE = (_rule_index, _rule_rowwise, _rule_scatter, _rule_gather, _rule_index_select, _rule_getitem)
#: ops with no tensor output that carry no data (asserts); they are kept shared
IGNORED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default}


def _rule_for(node: fx.Node) -> Rule | None:
    t = node.target
    if t in _RULES:
        return _RULES[t]
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
        return _rule_pointwise
    return None


# Step 1 + 2 ----------------------------------------------------------------------------------

def infer_token_axes(gm: fx.GraphModule, token_inputs: tuple[str, ...], T: int) -> TokenAxes:
    axes: dict[str, Axis] = {}
    ctx = _Ctx(axes, T)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name in token_inputs:
                shape = _shape(node)
                if not shape or shape[0] != T:
                    _fail(node, f"token input has shape {list(shape)}, expected [{T}, ...]")
                axes[node.name] = TokenDim(0)
            else:
                axes[node.name] = SHARED
        elif node.op == "get_attr":
            axes[node.name] = SHARED
        elif node.op == "output":
            continue
        elif node.op == "call_function":
            if node.target in IGNORED:  # asserts: run once per ubatch if they read tokens
                deps = [a for a in _tensor_args(node) if is_token_dependent(ctx.ax(a))]
                axes[node.name] = PER_UBATCH if deps else SHARED
                continue
            if node.target == aten.copy_.default:  # mutation epilogue: copy_(input, new value)
                axes[node.name] = ctx.ax(node.args[1]) if ctx.ax(node.args[1]) is STATE else _rule_pointwise(node, ctx)
                continue
            deps = [a for a in _tensor_args(node) if is_token_dependent(ctx.ax(a))]
            rule = _rule_for(node)
            if deps and all(ctx.ax(a) is STATE for a in deps) and rule not in _READS_STATE:
                axes[node.name] = STATE  # a view or copy of state is state
                continue
            if not deps and rule not in (_rule_getitem,):
                v = node.meta.get("val")
                axes[node.name] = tuple(SHARED for _ in v) if isinstance(v, (tuple, list)) else SHARED
                continue
            if rule is None:
                _fail(node, f"no token-axis rule for {node.target}: cannot tell whether it mixes "
                            "tokens (teach it with tbo_compiler.passes.token_axis.register_rule)")
            axes[node.name] = rule(node, ctx)
        else:
            _fail(node, f"unsupported node kind {node.op}")
    return TokenAxes(T, axes, tuple(token_inputs))
