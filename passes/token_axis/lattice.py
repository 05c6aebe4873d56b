"""The values the token-axis analysis gives every node (a lattice of where the tokens are).

  SHARED               depends on no token (weights, caches read before any write)
  TokenDim(a, o, i)    axis a has size o*T*i laid out as [o][T][i]: o "outer" blocks (e.g. ranks
                       after an all_gather), i rows per token
  PER_UBATCH           depends on the tokens but has no token axis (a comm handle)
  STATE                a shared tensor updated at token-indexed rows (a KV cache after index_put):
                       each ubatch updates it in turn
  a tuple of these     for an op with several outputs
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx


@dataclass(frozen=True)
class TokenDim:
    axis: int
    outer: int = 1
    inner: int = 1

    def size(self, T: int) -> int:
        return self.outer * T * self.inner


class _Tag(str):
    pass


SHARED = _Tag("shared")
PER_UBATCH = _Tag("per_ubatch")
STATE = _Tag("state")
Axis = Any  # TokenDim | SHARED | PER_UBATCH | STATE | tuple[Axis, ...]


def is_token_dependent(a: Axis) -> bool:
    if isinstance(a, tuple):
        return any(is_token_dependent(x) for x in a)
    return a is not SHARED


@dataclass(frozen=True)
class TokenAxes:
    T: int
    axes: dict          # node name -> Axis
    token_inputs: tuple  # placeholder names
    #: (node name, shared arg name) -> TokenDim: a shared operand whose axis lines up with the
    #: token axis of the op's result (a mask built from shapes, a zeros(T, ..) buffer); each
    #: ubatch's copy of the op reads its own rows of it (pairing row i with token i, as the op did)
    aligned: dict = None

    def __getitem__(self, node: fx.Node) -> Axis:
        return self.axes[node.name]
