"""Token-axis inference: which axis of each value carries the batch's tokens.

Contract
  requires   a functional ATen graph with meta["val"] on every node, traced at a static token
             count T (T >= 2), and the set of placeholders whose axis 0 is the token axis.
  guarantees a frozen `TokenAxes` record mapping every node to a value of the lattice
             (lattice.py: SHARED, TokenDim(axis, outer, inner), PER_UBATCH, STATE, tuples of them)
             plus `aligned`: shared operands (masks and buffers built from shapes) whose axis
             pairs row by row with the tokens of the op reading them -- each ubatch reads its rows;
             and `renumbered`: shared aranges numbering the rows of a permutation -- each ubatch
             numbers its own; or raises `TokenAxisError` naming the node and the user's source line where the graph
             cannot be split (an op reducing or sorting over tokens, a token axis that a view
             scatters, an op with no rule). The pipeline turns that error into a fallback (the
             graph runs unsplit, one warning) unless options.strict.
  must not   change the graph.

Coverage by construction: every op of PyTorch's core ATen opset has a rule of one family
(`family(op)`), one file each, every rule registered beside its code with
`@register(family, *ops, **facts)`: pointwise (any op tagged pointwise, broadcasting), view,
matmul, indexing, reduction (over non-token dims), batched (independent over leading dims:
attention, norms, convolution, pooling, padding), factory, kernel (the tbo ops), comm,
permutation (counts and grouped matmuls of a token-local region: a sort of the rows, per-row
work, the inverse; permutation.py says why that splits), or mixes (refused by name). `declare_op(op, kind)` teaches a user's op in one line; `register_rule` adds a
rule of its own. The facts registered with the rules (`writes_rows`, `has_sizes_arg`, `is_alias`,
`plain_factory`) are what the split pass and the cost model read about ops.

Pseudo-code (infer.py)
  Step 1: seed token placeholders with TokenDim(0, 1, 1), every other placeholder SHARED.
  Step 2: in topological order, apply the op's rule to its inputs' axes:
          pointwise (broadcast), views (mixed-radix match), layout ops, reductions and
          dim-ops (the token axis must not be the op's dim), matmuls (token not contracted),
          indexing and scatters (token-indexed writes into shared tensors give STATE),
          tbo kernels (row-wise), comm ops (outer *= W or /= W), getitem; a sort over the
          tokens gives rows in its order and positions, only indexing and grouped matmuls may
          read positions and per-ubatch counts, and only the inverse permutation (or a write at
          the positions) gives token-ordered rows again (permutation.py).
          The graph's outputs and input mutations must be token-ordered.
  Step 3: return the record.
"""
from __future__ import annotations

# the family files register their rules on import
from tbo_compiler.passes.token_axis import (  # noqa: F401
    batched, comm, factory, indexing, kernel, matmul, mixes, permutation, pointwise, reduction, view)
from tbo_compiler.passes.token_axis.declare import declare_op
from tbo_compiler.passes.token_axis.helpers import Ctx
from tbo_compiler.passes.token_axis.infer import IGNORED, infer_token_axes
from tbo_compiler.passes.token_axis.lattice import (
    PER_UBATCH, SHARED, STATE, Axis, Groups, TokenAxes, TokenDim, is_token_dependent)
from tbo_compiler.passes.token_axis.registry import (
    family, has_sizes_arg, is_alias, plain_factory, register, register_rule, writes_rows)
from tbo_compiler.passes.token_axis.view import view_map

_view_map = view_map  # the name tests/test_passes.py knows

__all__ = ["TokenDim", "Groups", "SHARED", "PER_UBATCH", "STATE", "Axis", "TokenAxes", "is_token_dependent",
           "infer_token_axes", "IGNORED", "family", "declare_op", "register", "register_rule", "Ctx",
           "writes_rows", "has_sizes_arg", "is_alias", "plain_factory", "view_map"]
