"""`declare_op`: a user's op taught in one line by the family it behaves like."""
from __future__ import annotations

import torch

from tbo_compiler.ops.errors import TokenAxisError
from tbo_compiler.passes.token_axis.factory import rule_factory
from tbo_compiler.passes.token_axis.kernel import rule_rowwise_any
from tbo_compiler.passes.token_axis.mixes import rule_mixes
from tbo_compiler.passes.token_axis.pointwise import rule_pointwise
from tbo_compiler.passes.token_axis.registry import register

_KINDS = {"rowwise": (rule_rowwise_any, "kernel"), "pointwise": (rule_pointwise, "pointwise"),
          "shared": (rule_factory, "factory")}


def declare_op(op, kind: str, why: str | None = None) -> None:
    """Teach the pass a custom op in one line; it adds to the built-in rules, never replaces them.

        declare_op(torch.ops.mylib.fused_mlp.default, "rowwise")   # row i of the output reads row i
        declare_op(torch.ops.mylib.scale.default, "pointwise")     # elementwise, broadcasting
        declare_op(torch.ops.mylib.table.default, "shared")        # its result depends on no token
        declare_op(torch.ops.mylib.sort_rows.default, "mixes", "sorts the batch")  # never split

    An OpOverloadPacket declares every overload."""
    if kind == "mixes":
        rule, fam = rule_mixes(why or f"{op} is declared to mix tokens"), "mixes"
    elif kind in _KINDS:
        rule, fam = _KINDS[kind]
    else:
        raise TokenAxisError(f"unknown token behaviour {kind!r} for {op} (rowwise, pointwise, shared, mixes)")
    targets = [getattr(op, o) for o in op.overloads()] if isinstance(op, torch._ops.OpOverloadPacket) else [op]
    register(fam, *targets)(rule)
