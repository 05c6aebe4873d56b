"""Batches as a serving engine builds them: tokens flattened to [T], a paged KV cache.

Every runtime input of a model's forward has the token axis first, so a batch splits into
micro-batches by slicing rows (the compiler's split pass relies on this):

  input_ids_T     int64  token ids
  positions_T     int64  absolute position of the token in its request (cached prefix included)
  slot_mapping_T  int64  cache slot (block * block_size + offset) this token's key/value goes to
  block_table_TB  int32  the token's request's block table (one row per token, zero padded)

Block 0 of every cache is the null block: padding tokens write there and read only it, and no
request is ever given it. A padding token therefore has slot_mapping < block_size
(`is_padding`). The kv caches (one tensor per layer, [num_blocks * block_size, ...]) are state:
the forward writes this step's entries, then attends over them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from tbo_compiler.ops.errors import RuntimeFailure, UsageError


@dataclass
class Batch:
    input_ids: Tensor
    positions: Tensor
    slot_mapping: Tensor
    block_table: Tensor
    query_lens: tuple[int, ...] = ()   # host-side: new tokens per request, padding excluded
    num_padding: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.input_ids, self.positions, self.slot_mapping, self.block_table

    def last_token_index(self) -> list[int]:
        """Row of each request's last new token (where a sampler reads the logits)."""
        ends, acc = [], 0
        for q in self.query_lens:
            acc += q
            ends.append(acc - 1)
        return ends

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in self.args()), self.query_lens, self.num_padding)


def is_padding(slot_mapping_T: Tensor, block_size: int) -> Tensor:
    return slot_mapping_T < block_size


@dataclass
class _Request:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens whose KV is in the cache


class PagedKVCache:
    """Block allocator plus the per-layer cache tensors.

    `entry_shapes[i]` is the shape of one cache slot of layer i (e.g. (576,) for MLA, (2, G, Dh)
    for GQA). Caches are zero-initialised, so never-written slots are zeros, not garbage."""

    def __init__(self, entry_shapes: Sequence[tuple[int, ...]], num_blocks: int, block_size: int,
                 dtype=torch.float32, device="cpu"):
        if num_blocks < 2:
            raise UsageError("PagedKVCache needs at least 2 blocks (block 0 is the null block)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.caches = [torch.zeros(num_blocks * block_size, *s, dtype=dtype, device=device)
                       for s in entry_shapes]
        self._free = list(range(num_blocks - 1, 0, -1))
        self._reqs: dict[object, _Request] = {}

    def num_cached(self, req_id) -> int:
        r = self._reqs.get(req_id)
        return r.num_tokens if r else 0

    def free(self, req_id) -> None:
        r = self._reqs.pop(req_id, None)
        if r:
            self._free.extend(reversed(r.blocks))

    def _reserve(self, req: _Request, total: int) -> None:
        need = -(-total // self.block_size) - len(req.blocks)
        if need > len(self._free):
            raise RuntimeFailure(f"KV cache out of blocks: need {need}, have {len(self._free)}")
        req.blocks.extend(self._free.pop() for _ in range(need))

    def make_batch(self, requests: Sequence[tuple[object, Sequence[int]]], *, pad_to: int | None = None,
                   max_blocks: int | None = None, device=None) -> Batch:
        """One step: `requests` is [(req_id, new_token_ids)]; each request's earlier tokens must
        already be in the cache (a prefill of a request with a cached prefix, a decode step, or an
        MTP step of several tokens look alike). Pads with null-block tokens to `pad_to` rows."""
        bs = self.block_size
        # per request in Python, per token in torch: the host cost is O(requests), not O(tokens)
        ids, pos, rows, qlens = [], [], [], []
        for req_id, new in requests:
            req = self._reqs.setdefault(req_id, _Request())
            start = req.num_tokens
            self._reserve(req, start + len(new))
            ids.extend(map(int, new))
            pos.extend(range(start, start + len(new)))
            rows.append(req.blocks)
            req.num_tokens = start + len(new)
            qlens.append(len(new))
        T = len(ids)
        pad = 0 if pad_to is None else pad_to - T
        if pad < 0:
            raise UsageError(f"batch has {T} tokens, more than pad_to={pad_to}")
        longest = max((len(r) for r, q in zip(rows, qlens) if q), default=0)  # requests with new tokens
        nb = max_blocks or max(longest, 1)
        if longest > nb:
            raise UsageError(f"request needs {longest} blocks, block table has {nb} columns")
        # padding rows: token 0 at position 0 in the null block (slot 0)
        table = torch.zeros(T + pad, nb, dtype=torch.int32)
        pos_t = torch.tensor(pos + [0] * pad, dtype=torch.int64)
        slots = torch.zeros(T + pad, dtype=torch.int64)
        if T:
            per_req = torch.tensor([r[:nb] + [0] * (nb - len(r)) for r in rows], dtype=torch.int64)
            owner = torch.tensor([i for i, q in enumerate(qlens) for _ in range(q)])  # each token's request
            table[:T] = per_req[owner].to(torch.int32)
            p = pos_t[:T]
            slots[:T] = per_req[owner, p // bs] * bs + p % bs
        batch = Batch(torch.tensor(ids + [0] * pad, dtype=torch.int64), pos_t, slots, table, tuple(qlens), pad)
        return batch.to(device) if device is not None else batch


def example_inputs(model, num_tokens: int, *, max_blocks: int, num_blocks: int, device="meta",
                   cache_dtype=None) -> tuple:
    """Shape-only inputs of a model's forward at `num_tokens` tokens: its `token_inputs` (each
    [T] int64 but the block table, [T, max_blocks] int32), then its KV caches."""
    T = num_tokens
    dt = cache_dtype or next(model.parameters()).dtype
    token = [torch.zeros(T, max_blocks, dtype=torch.int32, device=device) if name == "block_table"
             else torch.zeros(T, dtype=torch.int64, device=device) for name in model.token_inputs]
    caches = [torch.zeros(num_blocks * model.block_size, *s, dtype=dt, device=device)
              for s in model.kv_cache_entry_shapes()]
    return (*token, caches)
