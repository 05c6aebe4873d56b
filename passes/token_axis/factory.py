"""Factory family: ops whose result depends on no token data (factories, new_*(x, size) which
read only x's dtype and device, random draws, shape queries). A token-sized result made this way
is caught where it meets a token axis (the pointwise rule aligns it)."""
from __future__ import annotations

import torch

from tbo_compiler.passes.token_axis.lattice import SHARED
from tbo_compiler.passes.token_axis.registry import register, register_fallback

aten = torch.ops.aten


@register_fallback("shape", "factory")
@register("factory", aten.new_zeros.default, sizes_arg=True, plain_factory=aten.zeros.default)
@register("factory", aten.new_empty.default, sizes_arg=True, plain_factory=aten.empty.memory_format)
@register("factory", aten.new_full.default, sizes_arg=True, plain_factory=aten.full.default)
@register("factory", aten.new_ones.default, sizes_arg=True, plain_factory=aten.ones.default)
@register("factory", aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
          aten.arange.default, aten.arange.start, aten.arange.start_step, aten.scalar_tensor.default,
          aten.empty_strided.default, aten.rand.default, aten.randn.default, aten.randperm.default,
          aten.randint.default, aten.randint.low, aten.sym_size.int, aten.sym_numel.default,
          aten.sym_stride.int, aten.sym_storage_offset.default, aten.eye.default, aten.linspace.default)
def rule_factory(node, ctx):
    return SHARED
