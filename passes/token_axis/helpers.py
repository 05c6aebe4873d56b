"""What rules share: the context they read axes from and record aligned operands in, and the
argument helpers."""
from __future__ import annotations

import torch
import torch.fx as fx

from tbo_compiler.ops.errors import TokenAxisError, node_error
from tbo_compiler.passes.token_axis.lattice import SHARED, TokenDim, is_token_dependent


class Ctx:
    def __init__(self, axes: dict, T: int):
        self.axes, self.T = axes, T
        self.aligned: dict = {}
        self.renumbered: dict = {}

    def align(self, node: fx.Node, arg: fx.Node, ax: TokenDim) -> None:
        """`arg` is shared, but its axis `ax.axis` pairs row by row with the op's tokens."""
        if not ax.plain:
            fail(node, f"shared input {arg.name} as long as the tokens meets rows in the order of "
                       f"sort '{ax.order}' (its rows pair with tokens in token order)")
        prev = self.aligned.get((node.name, arg.name))
        if prev is not None and prev != ax:
            fail(node, f"shared input {arg.name} lines up with the tokens in two ways")
        self.aligned[(node.name, arg.name)] = ax

    def renumber(self, node: fx.Node, arg: fx.Node, ax: TokenDim) -> None:
        """`arg` is a shared arange numbering the rows of `ax`: each ubatch numbers its own."""
        self.renumbered[(node.name, arg.name)] = ax

    def ax(self, a):
        if isinstance(a, fx.Node):
            return self.axes[a.name]
        if isinstance(a, (list, tuple)):
            found = [self.ax(x) for x in a]
            dep = [x for x in found if is_token_dependent(x)]
            return dep[0] if dep else SHARED
        return SHARED


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def shape(n) -> tuple[int, ...]:
    v = val(n)
    return tuple(int(s) for s in v.shape)


def rank(node, i=0):
    return len(shape(node.args[i]))


def norm_dim(d: int, r: int) -> int:
    return d + r if d < 0 else d


def dim_arg(node, pos, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get("dim", default)


def tensor_args(node: fx.Node):
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
    return out


def token_inputs(node, ctx):
    return [(a, ctx.ax(a)) for a in tensor_args(node) if is_token_dependent(ctx.ax(a))]


def fail(node, why: str):
    raise node_error(TokenAxisError, node, why)


def align_shared(node, ctx, ax: TokenDim, positions) -> None:
    """Shared tensor args (at `positions`) of the token input's rank whose axis `ax.axis` is as
    long as the tokens pair row by row with them (e.g. an index built with zeros(T, ..)): each
    ubatch reads its rows."""
    for i in positions:
        a = node.args[i] if i < len(node.args) else None
        v = val(a)
        if (isinstance(a, fx.Node) and not is_token_dependent(ctx.ax(a)) and isinstance(v, torch.Tensor)
                and v.dim() > ax.axis and v.shape[ax.axis] == ax.size(ctx.T) and v.shape[ax.axis] != 1):
            ctx.align(node, a, ax)


def only_tokendims(node, ctx):
    ins = token_inputs(node, ctx)
    for a, ax in ins:
        if not isinstance(ax, TokenDim):
            fail(node, f"input {a.name} is {ax if not isinstance(ax, tuple) else 'a tuple'}, not a "
                       "token-major tensor")
    return ins


def require_plain(node, a, ax, what: str):
    """Ops that pair rows across ubatches or ranks (comm, joins) take token-ordered data only."""
    if isinstance(ax, TokenDim) and not ax.plain:
        why = (f"rows in the order of sort '{ax.order}'" if ax.points_to is None else
               f"positions of rows (the indices of a sort), numbered by each ubatch from 0")
        fail(node, f"{what} {a.name}, which holds {why}; only its inverse permutation gives rows "
                   "in token order")
