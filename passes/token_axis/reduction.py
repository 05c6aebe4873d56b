"""Reduction family: reductions, scans, sorts and softmax over a dim; the tokens must not be on it."""
from __future__ import annotations

import torch

from tbo_compiler.passes.token_axis.helpers import dim_arg, fail, norm_dim, shape
from tbo_compiler.passes.token_axis.lattice import SHARED, TokenDim
from tbo_compiler.passes.token_axis.registry import register

aten = torch.ops.aten


def dim_rule(pos: int, default, removes: bool, over_tokens=None):
    """A rule for an op over `dim` (args[pos], or kwargs["dim"]; 99: no dim arg, so `default`).
    `removes`: the dim goes away unless keepdim (args[pos + 1] or kwargs["keepdim"]).
    `over_tokens(node, ctx, ax)`: what the op gives over the token axis (a sort: permutation.py);
    without it the op mixes tokens there."""

    def rule(node, ctx):
        ax = ctx.ax(node.args[0])
        if not isinstance(ax, TokenDim):
            if ax is SHARED:
                return tuple(SHARED for _ in node.meta["val"]) if isinstance(node.meta.get("val"), (tuple, list)) else SHARED
            fail(node, f"input is {ax}")
        rank = len(shape(node.args[0]))
        dims = dim_arg(node, pos, default)
        if dims is None:
            dims = list(range(rank))
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [norm_dim(d, rank) for d in dims] if rank else []
        if ax.axis in dims:
            if over_tokens is not None and len(dims) == 1:
                return over_tokens(node, ctx, ax)
            fail(node, "reduces, sorts or scans over the token axis (mixes tokens)")
        keep = node.kwargs.get("keepdim", node.args[pos + 1] if len(node.args) > pos + 1 and
                               isinstance(node.args[pos + 1], bool) else False)
        a = ax.axis
        if removes and not keep:
            a -= sum(1 for d in dims if d < ax.axis)
        out = ax.at(a)
        v = node.meta.get("val")
        return tuple(out for _ in v) if isinstance(v, (tuple, list)) else out

    return rule


_DIM_OPS = (  # op, position of dim, default dim, whether the dim goes away
    (aten.sum.dim_IntList, 1, None, True), (aten.mean.dim, 1, None, True), (aten.amax.default, 1, None, True),
    (aten.amin.default, 1, None, True), (aten.max.dim, 1, None, True), (aten.min.dim, 1, None, True),
    (aten.argmax.default, 1, None, True), (aten.argmin.default, 1, None, True), (aten.any.dim, 1, None, True),
    (aten.any.dims, 1, None, True), (aten.all.dim, 1, None, True), (aten.prod.dim_int, 1, None, True),
    (aten.var_mean.correction, 1, None, True), (aten.logsumexp.default, 1, None, True),
    (aten.sum.default, 99, None, True), (aten.any.default, 99, None, True), (aten.mean.default, 99, None, True),
    (aten.prod.default, 99, None, True),
    (aten._softmax.default, 1, -1, False), (aten._log_softmax.default, 1, -1, False),
    (aten.topk.default, 2, -1, False),  # sort, argsort, cumsum: permutation.py
    (aten.cumprod.default, 1, None, False),
    (aten.flip.default, 1, None, False), (aten.roll.default, 2, None, False),
    (aten.var.correction, 1, None, True), (aten.var.dim, 1, None, True), (aten.std.correction, 1, None, True),
    (aten.median.dim, 1, None, True), (aten.mode.default, 1, None, True), (aten.kthvalue.default, 2, None, True),
    (aten.nansum.default, 1, None, True), (aten.norm.ScalarOpt_dim, 2, None, True),
    (aten.linalg_vector_norm.default, 2, None, True),
    (aten._fft_r2c.default, 1, None, False), (aten._fft_c2r.default, 1, None, False),
    (aten._fft_c2c.default, 1, None, False), (aten.logcumsumexp.default, 1, None, False),
    (aten.cummax.default, 1, None, False), (aten.cummin.default, 1, None, False),
)
for _op, _pos, _default, _removes in _DIM_OPS:
    register("reduction", _op)(dim_rule(_pos, _default, _removes))
