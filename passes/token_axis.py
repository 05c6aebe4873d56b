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
             plus `aligned`: shared operands (masks and buffers built from shapes) whose axis
             pairs row by row with the tokens of the op reading them -- each ubatch reads its rows;
             or raises `TokenAxisError` naming the node and the user's source line where the graph
             cannot be split (an op reducing or sorting over tokens, a token axis that a view
             scatters, an op with no rule). The pipeline turns that error into a fallback (the
             graph runs unsplit, one warning) unless options.strict.
  must not   change the graph.

Coverage by construction: every op of PyTorch's core ATen opset has a rule of one family
(`family(op)`): pointwise (any op tagged pointwise, broadcasting), view, matmul, indexing,
reduction (over non-token dims), batched (independent over leading dims: attention, norms,
convolution, pooling, padding), factory, kernel (the tbo ops), comm, or mixes (refused by name).
`declare_op(op, kind)` teaches a user's op in one line; rules add to the built-ins.

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
    #: (node name, shared arg name) -> TokenDim: a shared operand whose axis lines up with the
    #: token axis of the op's result (a mask built from shapes, a zeros(T, ..) buffer); each
    #: ubatch's copy of the op reads its own rows of it (pairing row i with token i, as the op did)
    aligned: dict = None

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
        self.aligned: dict = {}

    def align(self, node: fx.Node, arg: fx.Node, ax: TokenDim) -> None:
        """`arg` is shared, but its axis `ax.axis` pairs row by row with the op's tokens."""
        prev = self.aligned.get((node.name, arg.name))
        if prev is not None and prev != ax:
            _fail(node, f"shared input {arg.name} lines up with the tokens in two ways")
        self.aligned[(node.name, arg.name)] = ax

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


def _align_shared(node, ctx, ax: TokenDim, positions) -> None:
    """Shared tensor args (at `positions`) of the token input's rank whose axis `ax.axis` is as
    long as the tokens pair row by row with them (e.g. an index built with zeros(T, ..)): each
    ubatch reads its rows."""
    for i in positions:
        a = node.args[i] if i < len(node.args) else None
        v = _val(a)
        if (isinstance(a, fx.Node) and not is_token_dependent(ctx.ax(a)) and isinstance(v, torch.Tensor)
                and v.dim() > ax.axis and v.shape[ax.axis] == ax.size(ctx.T) and v.shape[ax.axis] != 1):
            ctx.align(node, a, ax)


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
    # a shared input with a full-size dim at the token axis pairs its rows with the tokens:
    # each ubatch reads its rows of it
    for a in _tensor_args(node):
        if not is_token_dependent(ctx.ax(a)) and _val(a) is not None and hasattr(_val(a), "shape"):
            s = _shape(a)
            k = result.axis - (r - len(s))
            if 0 <= k < len(s) and s[k] == out_shape[result.axis] and s[k] != 1:
                ctx.align(node, a, TokenDim(k, result.outer, result.inner))
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
        if axa.axis == 0:
            _align_shared(node, ctx, axa, (1,))
        return axa
    if isinstance(axb, TokenDim) and axb.axis in (0, 2) and not is_token_dependent(axa):
        if axb.axis == 0:
            _align_shared(node, ctx, axb, (0,))
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
        if isinstance(axi, TokenDim) and axi != a:
            _fail(node, "index has its tokens laid out differently")
        _align_shared(node, ctx, a, (0, 2))
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
            _align_shared(node, ctx, self_ax, (2, 3))
        return self_ax
    if any(is_token_dependent(o) for o in others) or self_ax is STATE:
        return STATE  # token-indexed rows written into a shared tensor (a KV cache)
    return SHARED


def _cat_inputs(node, ctx):
    """The token layout shared by every (non-empty) input of cat/stack, or SHARED."""
    tensors = [t for t in node.args[0] if not (_val(t) is not None and _val(t).numel() == 0 and _val(t).dim() == 1)]
    axes = [ctx.ax(t) for t in tensors]   # torch.cat skips legacy empty [0] tensors (an empty cache)
    dep = [a for a in axes if is_token_dependent(a)]
    if not dep:
        return SHARED, tensors
    if any(not isinstance(a, TokenDim) for a in dep) or len(dep) != len(axes) or len(set(dep)) != 1:
        _fail(node, "concatenates token and shared tensors, or tensors with different token axes")
    return dep[0], tensors


def _rule_cat(node, ctx):
    ax, tensors = _cat_inputs(node, ctx)
    if not isinstance(ax, TokenDim):
        return ax
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if _norm_dim(dim, len(_shape(tensors[0]))) == ax.axis:
        _fail(node, "concatenates along the token axis")
    return ax


def _rule_stack(node, ctx):  # stack inserts a new axis: it never runs along the token axis
    ax, _ = _cat_inputs(node, ctx)
    if not isinstance(ax, TokenDim):
        return ax
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = _norm_dim(dim, len(_shape(node)))
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


# ops independent over leading batch dims ------------------------------------------------------

def _batched_rule(nbatch: Callable[[fx.Node], int], batch_args: tuple = (0,)):
    """Ops that compute each index of their leading `nbatch(node)` dims on its own (convolution,
    pooling, padding, normalisation over trailing dims, attention over [B, H, L, E]): the token
    axis must be one of those dims, the same in every token input; weights stay shared. Outputs
    with that axis carry it; other token-dependent outputs are per ubatch."""

    def rule(node, ctx):
        ins = _only_tokendims(node, ctx)
        ax = ins[0][1]
        for a, other in ins[1:]:
            if other != ax:
                _fail(node, f"inputs put tokens on different axes ({ax} vs {other})")
        k = nbatch(node)
        if ax.axis >= k:
            _fail(node, f"the op works across axis {ax.axis} (only its first {k} axes are independent), "
                        "which holds the tokens")
        size = _shape(ins[0][0])[ax.axis]
        rank = len(_shape(ins[0][0]))
        batched = [node.args[i] for i in batch_args if i < len(node.args)] + [
            v for k, v in node.kwargs.items() if k in ("attn_mask",)]
        for a in batched:  # a shared operand as large as the batch would need slicing too
            v = _val(a)
            if (isinstance(a, fx.Node) and not is_token_dependent(ctx.ax(a)) and isinstance(v, torch.Tensor)
                    and v.dim() == rank and v.shape[ax.axis] == size and size != 1):
                ctx.align(node, a, ax)  # e.g. an attention mask built from shapes: row i, token i

        def out(v):
            if isinstance(v, torch.Tensor) and v.dim() > ax.axis and v.shape[ax.axis] == size:
                return ax
            return PER_UBATCH  # computed by each ubatch's copy, without a token axis (unused stats)

        v = node.meta.get("val")
        return tuple(out(x) for x in v) if isinstance(v, (tuple, list)) else out(v)

    return rule


def _rank(node, i=0):
    return len(_shape(node.args[i]))


def _nb_layer_norm(node):  # native_layer_norm(x, normalized_shape, w, b, eps)
    return _rank(node) - len(node.args[1])


def _nb_spatial(k):
    return lambda node: _rank(node) - k


def _nb_pad(node):  # constant_pad_nd(x, pad, value): pairs from the last dim backwards
    pad = list(node.args[1])
    touched = [i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]]
    return _rank(node) - (max(touched) + 1 if touched else 0)


def _nb_attention(node):  # sdpa(q [.., L, E], k [.., S, E], v, ...)
    return _rank(node) - 2


#: scaled_dot_product_attention variants: q/k/v [*batch, L|S, E], mask broadcast to [*batch, L, S];
#: tokens on a batch axis (a request per row, heads) are independent
_rule_attention = _batched_rule(_nb_attention, batch_args=(0, 1, 2, 3))


def _rule_batch_norm_eval(node, ctx):  # _native_batch_norm_legit_no_training(x, w, b, rm, rv, mom, eps)
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        _fail(node, f"input is {ax}")
    if ax.axis == 1:
        _fail(node, "normalises per channel on the token axis")
    if any(is_token_dependent(ctx.ax(a)) for a in node.args[1:5] if isinstance(a, fx.Node)):
        _fail(node, "running statistics carry tokens")
    return (ax, PER_UBATCH, PER_UBATCH)


def _rule_diagonal(node, ctx):  # diagonal(x, offset, dim1, dim2): both dims removed, diag appended
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    r = _rank(node)
    d1 = _norm_dim(node.args[2] if len(node.args) > 2 else 0, r)
    d2 = _norm_dim(node.args[3] if len(node.args) > 3 else 1, r)
    if ax.axis in (d1, d2):
        _fail(node, "takes a diagonal across the token axis")
    return TokenDim(ax.axis - sum(1 for d in (d1, d2) if d < ax.axis), ax.outer, ax.inner)


def _rule_repeat(node, ctx):  # repeat(x, repeats): tiles; new leading dims when len(repeats) > rank
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        return ax
    reps = list(node.args[1])
    a = ax.axis + len(reps) - _rank(node)
    return TokenDim(a, ax.outer * reps[a], ax.inner)


def _rule_slice_scatter(node, ctx):  # slice_scatter(x, src, dim, ...) / select_scatter(x, src, dim, i)
    ax, src = ctx.ax(node.args[0]), ctx.ax(node.args[1])
    r = _rank(node)
    dim = _norm_dim(node.args[2] if len(node.args) > 2 else 0, r)
    if not isinstance(ax, TokenDim):
        if not is_token_dependent(src):
            return ax
        if not isinstance(src, TokenDim):
            _fail(node, f"source is {src}")
        # a shared buffer (new_empty(B, ..)) filled with token rows: its rows pair with the tokens
        k = src.axis + (1 if node.target == aten.select_scatter.default and dim <= src.axis else 0)
        if k == dim or _shape(node.args[0])[k] != _shape(node.args[1])[src.axis]:
            _fail(node, "writes token rows into a part of a shared tensor")
        out = TokenDim(k, src.outer, src.inner)
        ctx.align(node, node.args[0], out)
        return out
    if dim == ax.axis:
        _fail(node, "writes a part of the token axis")
    want = ax
    if node.target == aten.select_scatter.default:
        want = TokenDim(ax.axis - (1 if dim < ax.axis else 0), ax.outer, ax.inner)
    if is_token_dependent(src) and src != want:
        _fail(node, f"source has its tokens laid out differently ({src} vs {want})")
    return ax


def _rule_mixes(why: str):
    """Ops that combine rows of their input by nature: accepted only when no token reaches them."""

    def rule(node, ctx):
        _fail(node, why)

    return rule


def _rule_shared(node, ctx):
    return SHARED


def _rule_rowwise_any(node, ctx):
    """A user op declared "rowwise": tokens on axis 0 of every token input and of every output
    with as many rows; shared inputs (weights) allowed."""
    ins = _only_tokendims(node, ctx)
    ax = ins[0][1]
    if ax.axis != 0 or any(other != ax for _, other in ins):
        _fail(node, "an op declared rowwise needs every token input with the same tokens on axis 0")
    rows = _shape(ins[0][0])[0]

    def out(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows:
            return ax
        return PER_UBATCH

    v = node.meta.get("val")
    return tuple(out(x) for x in v) if isinstance(v, (tuple, list)) else out(v)


_KINDS = {"rowwise": _rule_rowwise_any, "pointwise": _rule_pointwise, "shared": _rule_factory}


def declare_op(op, kind: str, why: str | None = None) -> None:
    """Teach the pass a custom op in one line; it adds to the built-in rules, never replaces them.

        declare_op(torch.ops.mylib.fused_mlp.default, "rowwise")   # row i of the output reads row i
        declare_op(torch.ops.mylib.scale.default, "pointwise")     # elementwise, broadcasting
        declare_op(torch.ops.mylib.table.default, "shared")        # its result depends on no token
        declare_op(torch.ops.mylib.sort_rows.default, "mixes", "sorts the batch")  # never split

    An OpOverloadPacket declares every overload."""
    if kind == "mixes":
        rule = _rule_mixes(why or f"{op} is declared to mix tokens")
    elif kind in _KINDS:
        rule = _KINDS[kind]
    else:
        raise TokenAxisError(f"unknown token behaviour {kind!r} for {op} (rowwise, pointwise, shared, mixes)")
    targets = [getattr(op, o) for o in op.overloads()] if isinstance(op, torch._ops.OpOverloadPacket) else [op]
    for t in targets:
        register_rule(t, rule)


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

    # ops independent over leading dims
    R(aten.native_layer_norm.default, _batched_rule(_nb_layer_norm))
    R(aten.native_group_norm.default, _batched_rule(lambda n: 1))
    R(aten.convolution.default, _batched_rule(lambda n: 1))
    R(aten.grid_sampler_2d.default, _batched_rule(lambda n: 1, batch_args=(0, 1)))
    R(aten.col2im.default, _batched_rule(lambda n: 1))
    R(aten.constant_pad_nd.default, _batched_rule(_nb_pad))
    for op, k in ((aten.avg_pool2d.default, 2), (aten.avg_pool3d.default, 3), (aten.max_pool2d_with_indices.default, 2),
                  (aten.max_pool3d_with_indices.default, 3), (aten._adaptive_avg_pool2d.default, 2),
                  (aten._adaptive_avg_pool3d.default, 3), (aten.upsample_bilinear2d.vec, 2),
                  (aten.upsample_nearest2d.vec, 2), (aten.reflection_pad1d.default, 1),
                  (aten.reflection_pad2d.default, 2), (aten.reflection_pad3d.default, 3),
                  (aten.replication_pad2d.default, 2), (aten.replication_pad3d.default, 3),
                  (aten.upsample_bilinear2d.default, 2), (aten.upsample_nearest2d.default, 2),
                  (aten._upsample_bilinear2d_aa.default, 2), (aten._upsample_nearest_exact2d.default, 2),
                  (aten.upsample_bicubic2d.default, 2), (aten.upsample_linear1d.default, 1),
                  (aten.upsample_nearest1d.default, 1), (aten.upsample_trilinear3d.default, 3),
                  (aten.upsample_nearest3d.default, 3), (aten.adaptive_max_pool2d.default, 2),
                  (aten.max_pool2d.default, 2), (aten.avg_pool1d.default, 1), (aten.max_pool1d.default, 1),
                  (aten.adaptive_avg_pool1d.default, 1), (aten.adaptive_max_pool1d.default, 1)):
        R(op, _batched_rule(_nb_spatial(k)))
    R(aten._cdist_forward.default, _batched_rule(_nb_spatial(2), batch_args=(0, 1)))
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "scaled_dot_product_attention", "_scaled_dot_product_attention_math"):
        if hasattr(aten, name):
            R(getattr(aten, name).default, _rule_attention)
    R(aten._native_batch_norm_legit_no_training.default, _rule_batch_norm_eval)
    R(aten.diagonal.default, _rule_diagonal)
    R(aten.repeat.default, _rule_repeat)
    R(aten.slice_scatter.default, _rule_slice_scatter)
    R(aten.select_scatter.default, _rule_slice_scatter)
    for op, pos in ((aten.var.correction, 1), (aten.var.dim, 1), (aten.std.correction, 1), (aten.prod.default, 99),
                    (aten._fft_r2c.default, 1), (aten._fft_c2r.default, 1), (aten._fft_c2c.default, 1),
                    (aten.logcumsumexp.default, 1), (aten.cummax.default, 1), (aten.cummin.default, 1),
                    (aten.median.dim, 1), (aten.mode.default, 1), (aten.kthvalue.default, 2),
                    (aten.nansum.default, 1), (aten.norm.ScalarOpt_dim, 2), (aten.linalg_vector_norm.default, 2)):
        R(op, _make_dim_rule(pos, None if pos != 99 else None, op not in (
            aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default, aten.logcumsumexp.default,
            aten.cummax.default, aten.cummin.default)))
    # ops that mix rows by nature: an error (a fallback) as soon as a token reaches them
    for op, why in (
        (aten.nonzero.default, "nonzero has a data-dependent shape over all tokens"),
        (aten._local_scalar_dense.default, "reads a token value on the host (.item())"),
        (aten._embedding_bag.default, "embedding_bag pools rows across tokens"),
        (aten.masked_scatter.default, "masked_scatter consumes its source in order across tokens"),
        (aten._native_batch_norm_legit.default, "batch norm in training mode takes statistics over the batch"),
        (aten._native_batch_norm_legit.no_stats, "batch norm in training mode takes statistics over the batch"),
        (aten._pdist_forward.default, "pdist pairs every row with every other"),
        (aten.as_strided.default, "as_strided may move the token axis anywhere (use view/permute)"),
        (aten.native_dropout.default, "dropout draws one random mask for the whole batch (eval() the model)"),
        (aten.convolution_backward.default, "a backward op sums weight gradients over the batch"),
        (aten.native_layer_norm_backward.default, "a backward op sums weight gradients over the batch"),
        (aten.native_group_norm_backward.default, "a backward op sums weight gradients over the batch"),
        (aten.embedding_dense_backward.default, "a backward op sums gradients over the tokens"),
        (aten.max_pool2d_with_indices_backward.default, "a backward op of a pooling layer"),
        (aten.avg_pool2d_backward.default, "a backward op of a pooling layer"),
        (aten._adaptive_avg_pool2d_backward.default, "a backward op of a pooling layer"),
        (aten.unique_dim.default, "unique compares every token with every other"),
        (aten._unique2.default, "unique compares every token with every other"),
        (aten.bincount.default, "bincount counts over all tokens"),
        (aten.histc.default, "histc counts over all tokens"),
        (aten.resize_.default, "resize_ changes the tensor's size in place"),
    ):
        R(op, _rule_mixes(why))
    # random factories and shape queries: no data from tokens
    for op in (aten.rand.default, aten.randn.default, aten.randperm.default, aten.randint.default,
               aten.randint.low, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
               aten.sym_storage_offset.default, aten.eye.default, aten.linspace.default):
        R(op, _rule_factory)

    c10d = torch.ops._c10d_functional
    R(c10d.all_reduce.default, _rule_c10d_same)
    R(c10d.wait_tensor.default, _rule_c10d_same)
    R(c10d.all_gather_into_tensor.default, _rule_c10d_all_gather)
    R(c10d.reduce_scatter_tensor.default, _rule_c10d_reduce_scatter)
    R(c10d.all_to_all_single.default, _rule_c10d_a2a)


_install_rules()  # the built-ins; register_rule adds to them, never replaces them

_FAMILIES = {
    "pointwise": (_rule_pointwise, _rule_same),
    "view": (_rule_view, _rule_permute, _rule_transpose, _rule_t, _rule_unsqueeze, _rule_squeeze, _rule_expand,
             _rule_slice, _rule_select, _rule_diagonal, _rule_repeat, _rule_split, _rule_cat, _rule_stack),
    "matmul": (_rule_mm, _rule_bmm),
    "indexing": (_rule_index, _rule_index_select, _rule_gather, _rule_scatter, _rule_slice_scatter),
    "factory": (_rule_factory,),
    "batched": (_rule_attention, _rule_batch_norm_eval),
    "kernel": (_rule_rowwise, _rule_rowwise_any, _rule_fan_out),
    "comm": (_rule_comm_start, _rule_comm_wait, _rule_c10d_same, _rule_c10d_all_gather, _rule_c10d_reduce_scatter,
             _rule_c10d_a2a),
    "tuple": (_rule_getitem,),
}
_FAMILY_OF = {r: f for f, rules in _FAMILIES.items() for r in rules}
_CLOSURE_FAMILY = {"_make_dim_rule": "reduction", "_batched_rule": "batched", "_rule_mixes": "mixes"}


def family(op) -> str | None:
    """How the pass treats `op`: pointwise, view, matmul, indexing, factory, reduction (over
    non-token dims), batched (independent over leading dims), kernel, comm, tuple, mixes (refused,
    so a graph reaching it runs unsplit) -- or None when it has no rule (also runs unsplit)."""
    rule = _RULES.get(op)
    if rule is None:
        rule = _rule_for_target(op)
        return None if rule is None else _FAMILY_OF[rule]
    if rule in _FAMILY_OF:
        return _FAMILY_OF[rule]
    outer = rule.__qualname__.split(".<locals>")[0]
    return _CLOSURE_FAMILY.get(outer, "user")
_READS_STATE = (_rule_index, _rule_rowwise, _rule_scatter, _rule_gather, _rule_index_select, _rule_getitem)
#: ops with no tensor output that carry no data (asserts); they are kept shared
IGNORED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default}


def _rule_for(node: fx.Node) -> Rule | None:
    return _rule_for_target(node.target)


def _rule_for_target(t) -> Rule | None:
    if t in _RULES:
        return _RULES[t]
    if isinstance(t, torch._ops.OpOverload):
        if torch.Tag.pointwise in t.tags:
            return _rule_pointwise
        if t.__name__.startswith("sym_"):  # shape queries (sym_size, sym_is_contiguous, ...)
            return _rule_factory
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
    return TokenAxes(T, axes, tuple(token_inputs), dict(ctx.aligned))
