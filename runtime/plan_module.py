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

Memory: each program carries the peak activation bytes it needs (passes/memory.py, stored in the
plan). On CUDA the construction compares each need with what the device has free (the driver's
free bytes plus what the caching allocator holds unused, less `MEMORY_MARGIN`): a program that
does not fit is dropped (the bucket keeps TBO alone when only serial is too big; "auto" then has
one program and measures nothing), and a bucket with no program that fits is refused with one
warning line; a batch that lands in it raises one RuntimeFailure line, never an out-of-memory in
the middle of a step. On CPU nothing is refused unless the caller passes `free_bytes` (tests do).
`memory_report()` and `largest_fitting_bucket()` tell a bench what fits.
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
# kept free beyond a program's estimated activations: kernels' own workspaces (a grouped GEMM's
# permuted tokens, comm staging), the allocator's fragmentation, cuBLAS/NCCL handles
MEMORY_MARGIN_FRACTION = 0.05     # of the free bytes
MEMORY_MARGIN_MIN = 512 << 20     # bytes: at least this much


def device_free_bytes(device: torch.device) -> int:
    """What a new allocation on `device` can draw on: the driver's free bytes plus the caching
    allocator's reserved-but-unallocated ones (tests monkeypatch this)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def memory_budget(free: int) -> int:
    """The bytes of activations a program may need on a device with `free` bytes free."""
    return max(0, int(free - max(MEMORY_MARGIN_FRACTION * free, MEMORY_MARGIN_MIN)))


def _size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class BucketProgram:
    """One compiled program of a plan: a bucket of `tokens` rows, cut at `cut` (0: no split)."""
    tokens: int
    cut: int
    gm: fx.GraphModule
    instrs: tuple[Instr, ...]
    inputs: tuple[tuple[str, str], ...]   # per placeholder: (param|buffer, FQN) or (user, index)
    predicted_us: float = 0.0
    need_bytes: int | None = None         # peak activation bytes (passes/memory.py); None: unknown


class PlanModule:
    def __init__(self, buckets: dict[int, dict[str, BucketProgram]], model, device, *, ep: int = 1,
                 group: str = "ep", policy: str = "auto", graphs: bool | None = None,
                 num_token_inputs: int = 4, inductor: bool = False, phase: str | None = None,
                 free_bytes: int | None = None):
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
        self.phase = phase
        self.free_bytes = free_bytes if free_bytes is not None else device_free_bytes(self.device) if cuda else None
        self._memory: list[dict] = []
        self.refused: dict[int, str] = {}      # bucket -> the one line saying why it cannot run
        self.dropped: dict[int, dict[str, str]] = {}   # bucket -> {variant: why}
        buckets = self._fit(buckets)
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
        self._slots: dict[tuple[int, str], tuple[list, list]] = {}  # args_for's per-program template

    # -- memory: which programs fit the device
    def _fit(self, buckets: dict[int, dict[str, BucketProgram]]) -> dict[int, dict[str, BucketProgram]]:
        """The programs that fit in the free memory; the refused buckets' lines in `self.refused`."""
        budget = None if self.free_bytes is None else memory_budget(self.free_bytes)
        for tokens in sorted(buckets):
            for variant, bp in sorted(buckets[tokens].items()):
                fits = None if budget is None or bp.need_bytes is None else bp.need_bytes <= budget
                self._memory.append({"tokens": tokens, "variant": variant, "need_bytes": bp.need_bytes,
                                     "budget_bytes": budget, "free_bytes": self.free_bytes, "fits": fits})
        if budget is None:
            return buckets
        where, phase = str(self.device), f" ({self.phase})" if self.phase else ""
        kept: dict[int, dict[str, BucketProgram]] = {}
        for tokens in sorted(buckets):
            progs = buckets[tokens]
            ok = {v: bp for v, bp in progs.items() if bp.need_bytes is None or bp.need_bytes <= budget}
            needs = {v: bp.need_bytes for v, bp in progs.items() if bp.need_bytes is not None}
            for v in set(progs) - set(ok):
                self.dropped.setdefault(tokens, {})[v] = (
                    f"bucket {tokens}{phase}: the {v} program needs {_size(needs[v])} of activations but "
                    f"{where} has {_size(self.free_bytes)} free ({_size(budget)} after the margin)")
            if ok:
                kept[tokens] = ok
                if len(ok) < len(progs):
                    log.warning("%s: runs %s only", self.dropped[tokens][sorted(set(progs) - set(ok))[0]],
                                "/".join(sorted(ok)))
                continue
            each = ", ".join(f"{v} {_size(needs[v])}" for v in VARIANTS if v in needs)
            self.refused[tokens] = (
                f"bucket {tokens}{phase} needs {_size(min(needs.values()))} of activations ({each}) but "
                f"{where} has {_size(self.free_bytes)} free ({_size(budget)} after the margin): refused; "
                f"largest bucket that fits: {max(kept) if kept else 'none'}")
            log.warning("%s", self.refused[tokens])
        for row in self._memory:
            row["kept"] = row["tokens"] in kept and row["variant"] in kept[row["tokens"]]
        return kept

    def memory_report(self) -> list[dict]:
        """Per bucket and program: tokens, variant, need_bytes (peak activations, None: unknown),
        free_bytes and budget_bytes of the device (None: not checked, e.g. on CPU), fits (None: not
        checked) and kept (the program can run)."""
        return [dict(r, kept=r.get("kept", True), phase=self.phase) for r in self._memory]

    def largest_fitting_bucket(self, phase: str | None = None) -> int | None:
        """The largest bucket that runs on this device (None: none does). `phase` ("prefill" or
        "decode"), when given, must be the plan's (a plan is compiled for one)."""
        if phase is not None and self.phase is not None and phase != self.phase:
            return None
        return max(self.buckets, default=None)

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

    def __call__(self, input_ids, positions, slot_mapping, block_table, kv_caches, *, variant: str | None = None,
                 copy_output: bool = True):
        """The logits of the batch's T rows. A CUDA graph writes them into its own static buffer, so
        they are copied out for the caller (`copy_output`, the default); a caller that reads them
        before its next call of this module (a serving loop sampling at once) may pass
        copy_output=False and get a view of that buffer: no copy, and no second logits in memory
        (2.3 GiB of fp32 logits at 4096 tokens of a 152k vocabulary)."""
        T = int(input_ids.shape[0])
        T_all = agree_num_tokens(T, self.group) if self.ep > 1 else T
        fits = [b for b in (*self.buckets, *self.refused) if b >= T_all]
        if not fits:
            raise RuntimeFailure(f"batch of {T_all} tokens exceeds the plan's largest bucket "
                                 f"({max((*self.buckets, *self.refused))}); recompile with a larger --tokens")
        tokens = min(fits)
        if tokens in self.refused:   # refused at load: it would run out of memory mid-step
            raise RuntimeFailure(f"batch of {T_all} tokens: {self.refused[tokens]}")
        pad = tokens - T
        user = [input_ids, positions, slot_mapping, block_table]
        if pad:  # padding rows: token 0 at position 0 in the null block, zero block table
            user = [torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for t in user]
        user += list(kv_caches)
        v = variant or self._choose(tokens, lambda v: self.args_for(tokens, v, user))
        if v not in self.buckets[tokens] and v in self.dropped.get(tokens, {}):
            raise RuntimeFailure(f"{self.dropped[tokens][v]}: dropped at load")
        if v not in self.buckets[tokens]:
            raise RuntimeFailure(f"bucket {tokens} has no {v} program (have {sorted(self.buckets[tokens])})")
        out = self.buckets[tokens][v][3](*self.args_for(tokens, v, user))
        if self.watchdog is not None:
            self.watchdog.mark(f"step (bucket {tokens}, {v})")
        logits = out[0]
        return logits[:T].clone() if self.graphs and copy_output else logits[:T]

    def run_mode(self, tokens: int, variant: str, mode: str) -> Program:
        """The bucket's program in another mode ("compute": no comm; "comm": comm alone), for timing."""
        bp = self.buckets[tokens][variant][0]
        return Program(bp.gm, bp.instrs, device=self.device, mode=mode)

    def args_for(self, tokens: int, variant: str, user: Sequence) -> list:
        """The program's arguments: its bound weights, and the caller's inputs where it takes them
        (the positions of those are kept per program: a step rebinds a handful, not every weight)."""
        key = (tokens, variant)
        if key not in self._slots:
            bound = self.buckets[tokens][variant][1]
            self._slots[key] = (list(bound), [(i, b) for i, b in enumerate(bound) if isinstance(b, int)])
        template, slots = self._slots[key]
        args = template.copy()
        for i, b in slots:
            args[i] = user[b]
        return args


__all__ = ["PlanModule", "BucketProgram", "VARIANTS"]
