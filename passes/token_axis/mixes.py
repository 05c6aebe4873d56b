"""Mixes family: ops that combine rows by nature. Accepted only where no token reaches them; a
graph whose tokens do runs unsplit (one warning naming the op and the user's line)."""
from __future__ import annotations

import torch

from tbo_compiler.passes.token_axis.helpers import fail
from tbo_compiler.passes.token_axis.registry import register

aten = torch.ops.aten


def rule_mixes(why: str):
    def rule(node, ctx):
        fail(node, why)

    return rule


_BACKWARD = "a backward op sums weight gradients over the batch"
_POOL_BACKWARD = "a backward op of a pooling layer"
_TRAIN_BN = "batch norm in training mode takes statistics over the batch"
_UNIQUE = "unique compares every token with every other"
for _op, _why in (
    (aten.nonzero.default, "nonzero has a data-dependent shape over all tokens"),
    (aten._local_scalar_dense.default, "reads a token value on the host (.item())"),
    (aten._embedding_bag.default, "embedding_bag pools rows across tokens"),
    (aten.masked_scatter.default, "masked_scatter consumes its source in order across tokens"),
    (aten._native_batch_norm_legit.default, _TRAIN_BN),
    (aten._native_batch_norm_legit.no_stats, _TRAIN_BN),
    (aten._pdist_forward.default, "pdist pairs every row with every other"),
    (aten.as_strided.default, "as_strided may move the token axis anywhere (use view/permute)"),
    (aten.native_dropout.default, "dropout draws one random mask for the whole batch (eval() the model)"),
    (aten.convolution_backward.default, _BACKWARD),
    (aten.native_layer_norm_backward.default, _BACKWARD),
    (aten.native_group_norm_backward.default, _BACKWARD),
    (aten.embedding_dense_backward.default, "a backward op sums gradients over the tokens"),
    (aten.max_pool2d_with_indices_backward.default, _POOL_BACKWARD),
    (aten.avg_pool2d_backward.default, _POOL_BACKWARD),
    (aten._adaptive_avg_pool2d_backward.default, _POOL_BACKWARD),
    (aten.unique_dim.default, _UNIQUE),
    (aten._unique2.default, _UNIQUE),
    (aten.resize_.default, "resize_ changes the tensor's size in place"),
):
    register("mixes", _op)(rule_mixes(_why))
