"""Running a plan: per bucket a TBO program and a serial one, padded inputs, CUDA graphs, and the
choice between the two made by measuring them.

`PlanModule(buckets, model, device)` is called like the model:
`(input_ids, positions, slot_mapping, block_table, kv_caches) -> logits`. Per call:
  1. ranks agree on the token count (one collective: the step's one host synchronisation) and
     take the smallest bucket that holds it, so every rank runs the same shapes and cut;
  2. the token inputs are padded to the bucket (padding rows: token 0, position 0, the null
     block) and the program runs; on CUDA as a replayed CUDA graph of the whole two-stream step;
  3. which program runs, TBO or serial, is the policy's: "tbo", "serial", or "auto". With "auto"
     on CUDA the first step of a bucket captures both, times their replays (back to back, in
     blocks ordered A B B A: graphs.time_replays) and keeps the faster; the ranks sum their
     timings with one collective, so they all keep the same program. On CPU "auto" follows the
     compiler's prediction (the plan's predicted_us).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from tbo_compiler.ops.errors import PlanError, RuntimeFailure
from tbo_compiler.ops.instr import Instr
from tbo_compiler.runtime.comm import agree_num_tokens, get_group
from tbo_compiler.runtime.comm.faults import step_watchdog
from tbo_compiler.runtime.env import flag
from tbo_compiler.runtime.graphs import GraphedProgram, time_replays
from tbo_compiler.runtime.program import Program

log = logging.getLogger(__name__)
VARIANTS = ("tbo", "serial")


@dataclass(frozen=True)
class BucketProgram:
    """One compiled program of a plan: a bucket of `tokens` rows, cut at `cut` (0: no split)."""
    tokens: int
    cut: int
    gm: fx.GraphModule
    instrs: tuple[Instr, ...]
    inputs: tuple[tuple[str, str], ...]   # per placeholder: (param|buffer, FQN) or (user, index)
    predicted_us: float = 0.0


class PlanModule:
    def __init__(self, buckets: dict[int, dict[str, BucketProgram]], model, device, *, ep: int = 1,
                 group: str = "ep", policy: str = "auto", graphs: bool | None = None,
                 num_token_inputs: int = 4, inductor: bool = False):
        if policy not in ("auto", *VARIANTS):
            raise RuntimeFailure(f"unknown TBO policy {policy!r} (auto, tbo, serial)")
        self.model, self.device = model, torch.device(device)
        self.block_size = model.block_size
        self.ep, self.group, self.policy = ep, group, policy
        self.num_token_inputs = num_token_inputs
        if ep > 1:  # registered by load_plan (tbo_compiler/load.py) or the caller: a clear error now
            get_group(group, ep)
        cuda = self.device.type == "cuda"
        self.graphs = cuda and (graphs if graphs is not None else flag("TBO_CUDA_GRAPHS"))
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        # a peer that dies mid-step leaves this GPU spinning in a collective: bounded (faults.py)
        self.watchdog = step_watchdog(group) if cuda and ep > 1 else None
        state = dict(model.named_parameters())
        state.update(dict(model.named_buffers()))
        self.buckets: dict[int, dict[str, tuple]] = {}
        for tokens in sorted(buckets, reverse=True):  # largest first: the shared pool fits the rest
            self.buckets[tokens] = {}
            for variant, bp in buckets[tokens].items():
                bound = [self._bind(kind, target, state) for kind, target in bp.inputs]
                prog = Program(bp.gm, bp.instrs, device=self.device, inductor=inductor)
                copied = [i for i, b in enumerate(bound) if isinstance(b, int) and b < num_token_inputs]
                run = GraphedProgram(prog, copied, self.pool, f"bucket {tokens} {variant}") if self.graphs else prog
                self.buckets[tokens][variant] = (bp, bound, prog, run)
        self.decisions: dict[int, dict] = {}

    @staticmethod
    def _bind(kind: str, target: str, state: dict):
        if kind in ("param", "buffer"):
            if target not in state:
                raise PlanError(f"plan needs {kind} {target}, which the model does not have")
            return state[target]
        if kind == "user":
            return int(target)
        raise PlanError(f"plan input {target} of kind {kind} cannot be bound")

    def new_kv_cache(self, num_blocks: int, **kw):
        return self.model.new_kv_cache(num_blocks, **kw)

    # -- which program a bucket runs
    def _choose(self, tokens: int, args_of) -> str:
        progs = self.buckets[tokens]
        if tokens in self.decisions:
            return self.decisions[tokens]["variant"]
        if self.policy != "auto" or len(progs) == 1:
            want = self.policy if self.policy in progs else next(iter(progs))
            self.decisions[tokens] = {"variant": want, "by": "policy" if self.policy in progs else "only one"}
        elif not self.graphs:
            pred = {v: progs[v][0].predicted_us for v in progs}
            want = min(VARIANTS, key=lambda v: (pred[v], v != "tbo"))
            self.decisions[tokens] = {"variant": want, "by": "predicted", "us": pred}
        else:
            ms = time_replays({v: (lambda v=v: progs[v][3](*args_of(v))) for v in VARIANTS})
            if self.ep > 1:  # every rank keeps the same program: decide on the sum of their timings
                import torch.distributed as dist
                t = torch.tensor([ms[v] for v in VARIANTS], dtype=torch.float64, device=self.device)
                dist.all_reduce(t, group=get_group(self.group, self.ep).pg)
                ms = {v: float(x) / self.ep for v, x in zip(VARIANTS, t.tolist())}
            want = min(VARIANTS, key=lambda v: ms[v])
            self.decisions[tokens] = {"variant": want, "by": "measured", "ms": ms}
            log.info("bucket %d: tbo %.3f ms, serial %.3f ms -> %s", tokens, ms["tbo"], ms["serial"], want)
        return self.decisions[tokens]["variant"]

    def __call__(self, input_ids, positions, slot_mapping, block_table, kv_caches, *, variant: str | None = None):
        T = int(input_ids.shape[0])
        T_all = agree_num_tokens(T, self.group) if self.ep > 1 else T
        fits = [b for b in self.buckets if b >= T_all]
        if not fits:
            raise RuntimeFailure(f"batch of {T_all} tokens exceeds the plan's largest bucket "
                                 f"({max(self.buckets)}); recompile with a larger --tokens")
        tokens = min(fits)
        pad = tokens - T
        user = [input_ids, positions, slot_mapping, block_table]
        if pad:  # padding rows: token 0 at position 0 in the null block, zero block table
            user = [torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for t in user]
        user += list(kv_caches)
        v = variant or self._choose(tokens, lambda v: self.args_for(tokens, v, user))
        if v not in self.buckets[tokens]:
            raise RuntimeFailure(f"bucket {tokens} has no {v} program (have {sorted(self.buckets[tokens])})")
        out = self.buckets[tokens][v][3](*self.args_for(tokens, v, user))
        if self.watchdog is not None:
            self.watchdog.mark(f"step (bucket {tokens}, {v})")
        logits = out[0]
        return logits[:T].clone() if self.graphs else logits[:T]

    def run_mode(self, tokens: int, variant: str, mode: str) -> Program:
        """The bucket's program in another mode ("compute": no comm; "comm": comm alone), for timing."""
        bp = self.buckets[tokens][variant][0]
        return Program(bp.gm, bp.instrs, device=self.device, mode=mode)

    def args_for(self, tokens: int, variant: str, user: Sequence) -> list:
        return [user[b] if isinstance(b, int) else b for b in self.buckets[tokens][variant][1]]


__all__ = ["PlanModule", "BucketProgram", "VARIANTS"]
