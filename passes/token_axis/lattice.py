"""The values the token-axis analysis gives every node (a lattice of where the tokens are).

  SHARED               depends on no token (weights, caches read before any write)
  TokenDim(a, o, i)    axis a has size o*T*i laid out as [o][T][i]: o "outer" blocks (e.g. ranks
                       after an all_gather), i rows per token
  PER_UBATCH           depends on the tokens but has no token axis (a comm handle)
  STATE                a shared tensor updated at token-indexed rows (a KV cache after index_put):
                       each ubatch updates it in turn
  a tuple of these     for an op with several outputs

Token-local regions (permutation.py): a sort over the token axis puts each ubatch's rows in an
order of its own. A TokenDim says which:
  order=P              the rows are in the order sort P (a node name) put them in, not token order:
                       row-wise work keeps it; nothing may pair these rows with token-ordered ones
  points_to=(Q, I)     the values are positions of rows on an axis of I rows per token in order Q
                       (None: token order): a sort's indices, their inverse. Each ubatch numbers its
                       own rows from 0, so only ops that index with them may read them
  keys_of=P            the values are sort P's sorted keys (what histc may count)
and Groups(P, kind) is a per-ubatch count of P's keys per group (histc) or its running sum (the
offsets of a grouped matmul): computed by each ubatch from its own rows, no token axis. A value of
either kind becomes ordinary again only through the inverse permutation.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch.fx as fx


@dataclass(frozen=True)
class TokenDim:
    axis: int
    outer: int = 1
    inner: int = 1
    order: str | None = None
    points_to: tuple | None = None
    keys_of: str | None = None

    def size(self, T: int) -> int:
        return self.outer * T * self.inner

    def at(self, axis: int) -> "TokenDim":
        """The same rows on another axis (a layout op); the values are no longer sorted keys."""
        return replace(self, axis=axis, keys_of=None)

    @property
    def plain(self) -> bool:
        """Token-ordered data (what comm, the split's joins and shared operands pair with)."""
        return self.order is None and self.points_to is None

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (("order", self.order), ("points_to", self.points_to),
                                                    ("keys_of", self.keys_of)) if v is not None)
        return f"TokenDim({self.axis}, {self.outer}, {self.inner}{extra})"


@dataclass(frozen=True)
class Groups:
    """Per-ubatch counts of sort `perm`'s keys (kind "counts") or their running sum ("offsets")."""
    perm: str
    kind: str


class _Tag(str):
    pass


SHARED = _Tag("shared")
PER_UBATCH = _Tag("per_ubatch")
STATE = _Tag("state")
Axis = Any  # TokenDim | Groups | SHARED | PER_UBATCH | STATE | tuple[Axis, ...]


def is_token_dependent(a: Axis) -> bool:
    if isinstance(a, tuple):
        return any(is_token_dependent(x) for x in a)
    return a is not SHARED


def is_order_local(a: Axis) -> bool:
    """Values that only ops reading sort results may take: positions (points_to) and Groups."""
    if isinstance(a, tuple):
        return any(is_order_local(x) for x in a)
    return isinstance(a, Groups) or (isinstance(a, TokenDim) and a.points_to is not None)


def is_reordered(a: Axis) -> bool:
    """Anything a sort over the tokens left behind (rows in a sort's order, positions, Groups)."""
    if isinstance(a, tuple):
        return any(is_reordered(x) for x in a)
    return isinstance(a, Groups) or (isinstance(a, TokenDim) and not a.plain)


@dataclass(frozen=True)
class TokenAxes:
    T: int
    axes: dict          # node name -> Axis
    token_inputs: tuple  # placeholder names
    #: (node name, shared arg name) -> TokenDim: a shared operand whose axis lines up with the
    #: token axis of the op's result (a mask built from shapes, a zeros(T, ..) buffer); each
    #: ubatch's copy of the op reads its own rows of it (pairing row i with token i, as the op did)
    aligned: dict = None
    #: (node name, shared arange name) -> TokenDim: an arange as long as the rows it numbers (the
    #: values of an inverse permutation); each ubatch's copy of the op numbers its own rows from 0
    renumbered: dict = None

    def __getitem__(self, node: fx.Node) -> Axis:
        return self.axes[node.name]
