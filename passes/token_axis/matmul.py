"""Matmul family: the token axis may be a row of either operand, never the contracted dim."""
from __future__ import annotations

import torch

from tbo_compiler.passes.token_axis.helpers import align_shared, fail
from tbo_compiler.passes.token_axis.lattice import SHARED, TokenDim, is_token_dependent
from tbo_compiler.passes.token_axis.registry import register

aten = torch.ops.aten


@register("matmul", aten.mm.default, aten.addmm.default)
def rule_mm(node, ctx):  # mm(a[M,K], b[K,N]); addmm(bias, a, b)
    off = 1 if node.target == aten.addmm.default else 0
    a, b = node.args[off], node.args[off + 1]
    axa, axb = ctx.ax(a), ctx.ax(b)
    bias = ctx.ax(node.args[0]) if off else SHARED
    if is_token_dependent(bias) and not (isinstance(bias, TokenDim) and isinstance(axa, TokenDim)
                                         and bias.order == axa.order and bias.points_to is None):
        fail(node, "bias carries tokens, or its rows are in another order than the input's")
    if isinstance(axa, TokenDim) and axa.axis == 0 and not is_token_dependent(axb):
        return axa
    if isinstance(axb, TokenDim) and axb.axis == 1 and not is_token_dependent(axa):
        return axb
    if not is_token_dependent(axa) and not is_token_dependent(axb):
        return SHARED
    fail(node, "contracts over the token axis or multiplies two token tensors (mixes tokens)")


@register("matmul", aten.bmm.default)
def rule_bmm(node, ctx):  # bmm(a[B,M,K], b[B,K,N])
    a, b = node.args[0], node.args[1]
    axa, axb = ctx.ax(a), ctx.ax(b)
    if isinstance(axa, TokenDim) and isinstance(axb, TokenDim) and axa.axis == 0 and axb.axis == 0 and axa == axb:
        return axa
    if isinstance(axa, TokenDim) and axa.axis in (0, 1) and not is_token_dependent(axb):
        if axa.axis == 0:
            align_shared(node, ctx, axa, (1,))
        return axa
    if isinstance(axb, TokenDim) and axb.axis in (0, 2) and not is_token_dependent(axa):
        if axb.axis == 0:
            align_shared(node, ctx, axb, (0,))
        return axb if axb.axis == 0 else axb.at(2)
    if not is_token_dependent(axa) and not is_token_dependent(axb):
        return SHARED
    fail(node, "batched matmul mixes tokens")
