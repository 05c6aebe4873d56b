"""Batched family: ops independent over their leading dims (attention over [B, H, L, E], norms
over trailing dims, convolution, pooling, padding, upsampling); the tokens must be on one of them."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from tbo_compiler.passes.token_axis.helpers import fail, only_tokendims, rank, shape, val
from tbo_compiler.passes.token_axis.lattice import PER_UBATCH, TokenDim, is_token_dependent
from tbo_compiler.passes.token_axis.registry import register

aten = torch.ops.aten


def batched_rule(nbatch: Callable[[fx.Node], int], batch_args: tuple = (0,)):
    """Ops that compute each index of their leading `nbatch(node)` dims on its own: the token
    axis must be one of those dims, the same in every token input; weights stay shared. Outputs
    with that axis carry it; other token-dependent outputs are per ubatch."""

    def rule(node, ctx):
        ins = only_tokendims(node, ctx)
        ax = ins[0][1]
        for a, other in ins[1:]:
            if other != ax:
                fail(node, f"inputs put tokens on different axes ({ax} vs {other})")
        k = nbatch(node)
        if ax.axis >= k:
            fail(node, f"the op works across axis {ax.axis} (only its first {k} axes are independent), "
                       "which holds the tokens")
        size = shape(ins[0][0])[ax.axis]
        r = len(shape(ins[0][0]))
        batched = [node.args[i] for i in batch_args if i < len(node.args)] + [
            v for k, v in node.kwargs.items() if k in ("attn_mask",)]
        for a in batched:  # a shared operand as large as the batch would need slicing too
            v = val(a)
            if (isinstance(a, fx.Node) and not is_token_dependent(ctx.ax(a)) and isinstance(v, torch.Tensor)
                    and v.dim() == r and v.shape[ax.axis] == size and size != 1):
                ctx.align(node, a, ax)  # e.g. an attention mask built from shapes: row i, token i

        def out(v):
            if isinstance(v, torch.Tensor) and v.dim() > ax.axis and v.shape[ax.axis] == size:
                return ax
            return PER_UBATCH  # computed by each ubatch's copy, without a token axis (unused stats)

        v = node.meta.get("val")
        return tuple(out(x) for x in v) if isinstance(v, (tuple, list)) else out(v)

    return rule


def _nb_layer_norm(node):  # native_layer_norm(x, normalized_shape, w, b, eps)
    return rank(node) - len(node.args[1])


def _nb_spatial(k):
    return lambda node: rank(node) - k


def _nb_pad(node):  # constant_pad_nd(x, pad, value): pairs from the last dim backwards
    pad = list(node.args[1])
    touched = [i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]]
    return rank(node) - (max(touched) + 1 if touched else 0)


def _nb_attention(node):  # sdpa(q [.., L, E], k [.., S, E], v, ...)
    return rank(node) - 2


register("batched", aten.native_layer_norm.default)(batched_rule(_nb_layer_norm))
register("batched", aten.native_group_norm.default, aten.convolution.default, aten.col2im.default)(
    batched_rule(lambda n: 1))
register("batched", aten.grid_sampler_2d.default)(batched_rule(lambda n: 1, batch_args=(0, 1)))
register("batched", aten.constant_pad_nd.default)(batched_rule(_nb_pad))
register("batched", aten._cdist_forward.default)(batched_rule(_nb_spatial(2), batch_args=(0, 1)))

_SPATIAL = (  # op, how many trailing spatial dims it works across
    (aten.avg_pool2d.default, 2), (aten.avg_pool3d.default, 3), (aten.max_pool2d_with_indices.default, 2),
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
    (aten.adaptive_avg_pool1d.default, 1), (aten.adaptive_max_pool1d.default, 1))
for _op, _k in _SPATIAL:
    register("batched", _op)(batched_rule(_nb_spatial(_k)))

#: scaled_dot_product_attention variants: q/k/v [*batch, L|S, E], mask broadcast to [*batch, L, S];
#: tokens on a batch axis (a request per row, heads) are independent
rule_attention = register("batched", *(getattr(aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention", "_scaled_dot_product_attention_math") if hasattr(aten, name)))(
    batched_rule(_nb_attention, batch_args=(0, 1, 2, 3)))


@register("batched", aten._native_batch_norm_legit_no_training.default)
def rule_batch_norm_eval(node, ctx):  # _native_batch_norm_legit_no_training(x, w, b, rm, rv, mom, eps)
    ax = ctx.ax(node.args[0])
    if not isinstance(ax, TokenDim):
        fail(node, f"input is {ax}")
    if ax.axis == 1:
        fail(node, "normalises per channel on the token axis")
    if any(is_token_dependent(ctx.ax(a)) for a in node.args[1:5] if isinstance(a, fx.Node)):
        fail(node, "running statistics carry tokens")
    return (ax, PER_UBATCH, PER_UBATCH)
