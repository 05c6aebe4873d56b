"""Op -> rule, family and facts. Each family file registers its rules beside their code with
`@register(family, *ops, **facts)` (as Inductor's `@register_lowering`); the split pass and the
cost model read the facts here instead of keeping their own op lists."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

Rule = Callable[..., Any]  # rule(node, ctx) -> Axis


@dataclass(frozen=True)
class OpRule:
    rule: Rule
    family: str
    #: the rule itself handles STATE inputs (a read of a cache), rather than the op's result
    #: being state too (a view or copy of state)
    reads_state: bool = False
    #: writes token-indexed rows into its first argument (index_put, scatter): state is chained
    writes_rows: bool = False
    #: args[1] is a size list holding the token axis (view, expand, new_zeros): the split rewrites it
    sizes_arg: bool = False
    #: a view that launches no kernel (the cost model counts it as free)
    alias: bool = False
    #: new_*(x, size, ...) reads only x's dtype and device: it is this factory of `size`
    plain_factory: Any = None
    #: the rule takes what a sort over the tokens leaves (positions, per-ubatch counts); every
    #: other op reading one is refused before its rule runs
    reads_order: bool = False
    #: its result may be a sort's keys (the sort, copies, getitem); every other op's result is not
    keeps_keys: bool = False


_REGISTRY: dict[Any, OpRule] = {}
#: rules for ops with no registration of their own: "pointwise" (any op tagged pointwise) and
#: "shape" (sym_size, sym_is_contiguous, ...: shape queries)
_FALLBACKS: dict[str, OpRule] = {}


def register(family: str, *ops, **facts) -> Callable[[Rule], Rule]:
    """Decorator: `rule` is how the pass treats `ops` (of `family`); returns the rule unchanged,
    so several registrations with different facts can be stacked on one rule."""

    def deco(rule: Rule) -> Rule:
        for op in ops:
            _REGISTRY[op] = OpRule(rule, family, **facts)
        return rule

    return deco


def register_fallback(kind: str, family: str) -> Callable[[Rule], Rule]:
    def deco(rule: Rule) -> Rule:
        _FALLBACKS[kind] = OpRule(rule, family)
        return rule

    return deco


def register_rule(target, rule: Rule, family: str = "user") -> None:
    """Teach the pass an op: `rule(node, ctx) -> Axis` (see lattice.py for the values)."""
    _REGISTRY[target] = OpRule(rule, family)


def register_named(family: str, qualname: str, **facts) -> Callable[[Rule], Rule]:
    """As `register`, for an op of a library that may not be loaded ("transformers::grouped_mm_fallback",
    every overload): the rule applies once the op exists."""

    def deco(rule: Rule) -> Rule:
        _BY_NAME[qualname] = OpRule(rule, family, **facts)
        return rule

    return deco


_BY_NAME: dict[str, OpRule] = {}


def lookup(target) -> OpRule | None:
    """The op's registration; ops tagged pointwise and shape queries have one by construction."""
    r = _REGISTRY.get(target)
    if r is not None or not isinstance(target, torch._ops.OpOverload):
        return r
    r = _BY_NAME.get(target.name().split(".")[0])
    if r is not None:
        return r
    if torch.Tag.pointwise in target.tags:
        return _FALLBACKS["pointwise"]
    if target.__name__.startswith("sym_"):
        return _FALLBACKS["shape"]
    return None


def family(op) -> str | None:
    """How the pass treats `op`: pointwise, view, matmul, indexing, factory, reduction (over
    non-token dims), batched (independent over leading dims), kernel, comm, tuple, mixes (refused,
    so a graph reaching it runs unsplit), user (register_rule) -- or None when it has no rule (also
    runs unsplit)."""
    r = lookup(op)
    return None if r is None else r.family


# facts the other passes read --------------------------------------------------------------------

def writes_rows(op) -> bool:
    r = _REGISTRY.get(op)
    return bool(r and r.writes_rows)


def has_sizes_arg(op) -> bool:
    r = _REGISTRY.get(op)
    return bool(r and r.sizes_arg)


def is_alias(op) -> bool:
    r = _REGISTRY.get(op)
    return bool(r and r.alias)


def plain_factory(op):
    r = _REGISTRY.get(op)
    return r.plain_factory if r else None
