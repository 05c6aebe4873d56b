"""A serving benchmark: continuous batching over the runtime's plans, TBO off / forced / auto.

    python bench/serve_bench.py --slice gpt_oss --out $OUT                      # one GPU, EP=1
    torchrun --nproc-per-node 2 bench/serve_bench.py --slice deepseek_v3 --out $OUT
    python bench/serve_bench.py --model-dir tiny_qwen3 --ep 2 --dtype float32 \\
        --num-requests 16 --input-len 32 --output-len 8 --concurrency 4,8 --out out/sb  # spawned gloo ranks

Workload (seeded: every mode serves the same requests): N requests, input and output lengths
uniform in [0.8 L, L], random token ids; all submitted at time 0 (or Poisson arrivals with
--request-rate R requests/s), at most --concurrency requests in flight. Request i is served by
rank i % EP (DP attention + EP: every rank holds its own requests, the experts are shared), and a
rank keeps at most ceil(C / EP) of them in flight.

Each rank runs this loop (Step N below):
  1. admit: arrived requests enter the flight while a slot is free and the KV cache can hold their
     whole context (input + output, so no request is ever preempted); blocks are taken as the
     request grows (`PagedKVCache.make_batch`) and given back when it completes;
  2. plan the step under the token budget: one decode token per running request, then prefill
     chunks of admitted requests in arrival order (a long prompt spans several steps);
  3. agree with the other ranks, one all_reduce(MAX) of (step kind, tokens if mixed, tokens if
     decode): a step is "mixed" (prefill chunks and decode tokens in one batch, through the
     prefill plan, whose token-balanced split lets a request straddle the cut) when any rank has
     prefill work, else "decode" (decode plan). Every rank pads its batch to the agreed bucket
     (a rank with nothing to do runs padding only), so the plan's own agreement finds the same
     bucket; all ranks idle -> sleep until the next arrival; all done -> stop;
  4. run the plan, sample greedily (argmax of each sampling row: a decode token, or a prompt's
     last chunk), record token times; a request with all its output tokens (EOS ignored) frees
     its blocks and its slot.
At the end every block is back in the free list (checked). Metrics as serving benchmarks print
them (vLLM / SGLang bench_serving, ATOM): TTFT from the moment a request got its slot, TPOT =
(latency - TTFT) / (output - 1), ITL = every gap between two tokens of a request.

Output (--out): serve_bench.json (the config, per (mode, concurrency) the summary, the step
counts and each plan's bucket -> program decisions), serve_bench.md (the command and one table,
a column per run, for bench/RESULTS.md), with --plot serve_bench_throughput.png (output tokens/s
per GPU against concurrency, a line per mode; skipped with a note without matplotlib). Besides the
seeds' fields: the padded-token share (bucket padding and the ranks' unequal loads) and the host
share of step time (admission, agreement, building the batch: time the GPU has nothing queued).
Plans are compiled here (--work-dir, default a temporary dir; under torchrun OUT/work): a prefill
plan over --prefill-buckets for mixed steps, a decode plan over --decode-buckets.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # tbo_bench (the slices, random weights) when imported from elsewhere
    sys.path.append(_HERE)

MODES = ("serial", "tbo", "auto")   # the runtime's policies: TBO off, forced, measured/predicted


# Step 0: the workload -----------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    rid: int
    prompt: tuple[int, ...]
    output_len: int
    arrival: float  # seconds after the start


def make_workload(num_requests: int, input_len: int, output_len: int, vocab: int, *, seed: int = 0,
                  request_rate: float = math.inf, ratio: float = 0.8) -> list[Request]:
    """Lengths uniform in [ratio * L, L]; token ids in [1, vocab); Poisson arrivals at `request_rate`."""
    g = torch.Generator().manual_seed(seed)

    def lengths(L):
        lo = max(1, math.ceil(ratio * L))
        return torch.randint(lo, L + 1, (num_requests,), generator=g).tolist()

    ins, outs = lengths(input_len), lengths(output_len)
    if math.isinf(request_rate):
        arrivals = [0.0] * num_requests
    else:
        gaps = torch.empty(num_requests, dtype=torch.float64).exponential_(request_rate, generator=g)
        arrivals = torch.cumsum(gaps, 0).tolist()
    return [Request(i, tuple(torch.randint(1, vocab, (n,), generator=g).tolist()), o, a)
            for i, (n, o, a) in enumerate(zip(ins, outs, arrivals))]


# Step 1: one rank's scheduler ---------------------------------------------------------------

@dataclass
class _Live:
    req: Request
    sent: float                      # when it got its slot (the client "sent" it)
    admitted: float                  # when the scheduler took it (slot and KV blocks free)
    prefilled: int = 0               # prompt tokens in the cache
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


def free_blocks(kv) -> int:
    # PagedKVCache keeps no public count of its free list (a `num_free_blocks` would do)
    return len(kv._free)


class Scheduler:
    """Continuous batching for one rank: admission, the step's batch, sampling, completion."""

    def __init__(self, reqs, kv, *, concurrency: int, token_budget: int, max_blocks: int):
        self.kv, self.bs = kv, kv.block_size
        self.concurrency, self.budget, self.max_blocks = concurrency, token_budget, max_blocks
        if token_budget <= concurrency:
            raise ValueError(f"token budget {token_budget} must exceed the per-rank concurrency {concurrency}")
        self.waiting = deque(sorted(reqs, key=lambda r: (r.arrival, r.rid)))
        for r in self.waiting:
            need = self._blocks(r)
            if need > max_blocks or need > kv.num_blocks - 1:
                raise ValueError(f"request {r.rid} needs {need} KV blocks: the plan's block table has "
                                 f"{max_blocks} columns, the cache {kv.num_blocks - 1} blocks")
        self.live: list[_Live] = []
        self.slots = [0.0] * concurrency     # heap: when each slot became free
        self.committed = 0                   # blocks promised to live requests (whole contexts)
        self.max_live = 0
        self.done: list[dict] = []

    def _blocks(self, r: Request) -> int:
        return -(-(len(r.prompt) + r.output_len) // self.bs)

    def admit(self, now: float) -> None:
        while (self.waiting and self.waiting[0].arrival <= now and len(self.live) < self.concurrency
               and self.committed + self._blocks(self.waiting[0]) <= self.kv.num_blocks - 1):
            r = self.waiting.popleft()
            self.committed += self._blocks(r)
            self.live.append(_Live(r, max(r.arrival, heapq.heappop(self.slots)), now))
        self.max_live = max(self.max_live, len(self.live))

    def plan(self):
        """(decode entries, prefill entries): [(live, new tokens, samples?)] under the token budget."""
        dec = [(s, [s.tokens[-1]], True) for s in self.live if s.prefilled == len(s.req.prompt)]
        left, pre = self.budget - len(dec), []
        for s in self.live:
            n = len(s.req.prompt) - s.prefilled
            if n and left:
                k = min(n, left)
                pre.append((s, list(s.req.prompt[s.prefilled:s.prefilled + k]), k == n))
                left -= k
        return dec, pre

    def flag(self, dec, pre) -> int:
        """3: prefill work, 2: decode only, 1: idle with requests still to come, 0: done."""
        return 3 if pre else 2 if dec else 1 if self.waiting else 0

    def next_arrival(self) -> float | None:
        return self.waiting[0].arrival if self.waiting else None

    def finish_step(self, entries, sampled: list[int], now: float) -> None:
        it = iter(sampled)
        for s, new, samples in entries:
            if s.prefilled < len(s.req.prompt):
                s.prefilled += len(new)
            if not samples:
                continue
            s.tokens.append(next(it))
            s.times.append(now)
            if len(s.tokens) == s.req.output_len:
                self._complete(s, now)

    def _complete(self, s: _Live, now: float) -> None:
        self.kv.free(s.req.rid)
        self.live.remove(s)
        self.committed -= self._blocks(s.req)
        heapq.heappush(self.slots, now)
        self.done.append({"rid": s.req.rid, "input_len": len(s.req.prompt), "output_len": s.req.output_len,
                          "arrival": s.req.arrival, "sent": s.sent, "admitted": s.admitted, "times": s.times,
                          "tokens": s.tokens})


# Step 2: the loop ---------------------------------------------------------------------------

_CPU_GROUP: list = []


def _agreement_group(world: int):
    """A gloo group over the ranks for the step agreement: on CPU tensors, so agreeing never waits
    for the GPU (over NCCL it would sync the stream, and the host could not plan a step ahead).
    Created on the first agreement, which every rank reaches in step."""
    import torch.distributed as dist

    from tbo_compiler.runtime.comm import get_group

    pg = get_group("ep", world).pg
    if "gloo" in str(dist.get_backend(pg)):
        return pg
    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(ranks=dist.get_process_group_ranks(pg), backend="gloo"))
    return _CPU_GROUP[0]


def agree_max(vals: list[int], world: int) -> list[int]:
    """Element-wise max over the ranks (one collective, on the host)."""
    if world == 1:
        return list(vals)
    import torch.distributed as dist

    t = torch.tensor(vals, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_agreement_group(world))
    return t.tolist()


def bucket_of(run, tokens: int) -> int:
    fits = [b for b in run.buckets if b >= tokens]
    if not fits:
        raise ValueError(f"a step of {tokens} tokens exceeds the plan's largest bucket ({max(run.buckets)})")
    return min(fits)


def warm_up(runs: dict, kv, max_blocks: int, vocab: int, device) -> None:
    """Every bucket of every plan once (CUDA-graph capture, the auto policy's choice), on rows that
    only touch the null block: random ids so the routing is not degenerate; all ranks alike."""
    g = torch.Generator().manual_seed(0)
    for run in runs.values():
        for b in sorted(run.buckets):
            ids = torch.randint(1, vocab, (b,), generator=g)
            zeros = torch.zeros(b, dtype=torch.int64)
            args = [t.to(device) for t in (ids, zeros, zeros, torch.zeros(b, max_blocks, dtype=torch.int32))]
            with torch.no_grad():
                run(*args, kv.caches)
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Pending:
    """A sampled token still on the device: row `row` of the step's sampled ids."""
    __slots__ = ("row",)

    def __init__(self, row: int):
        self.row = row


class _Launched:
    """A step whose sampled ids are on their way to the host (overlap mode): the ids on the device
    (the next step's decode tokens read them there), their pinned host copy and the event after it,
    and where each id goes: (live request, index in its tokens)."""

    def __init__(self, sampled_dev, device, dests):
        self.dev = sampled_dev
        self.dests = dests
        if device.type == "cuda":
            self.host = torch.empty(sampled_dev.shape, dtype=sampled_dev.dtype, pin_memory=True)
            self.host.copy_(sampled_dev, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = sampled_dev, None

    def resolve(self, now: float) -> None:
        """Wait for this step alone (not for the step launched after it), write the ids in."""
        if self.ready is not None:
            self.ready.synchronize()
        for (s, k), tok in zip(self.dests, self.host.tolist()):
            s.tokens[k] = tok
            s.times[k] = now


def _to_device(batch, device, pinned: bool):
    """The batch on the device; from pinned memory without waiting for the GPU (overlap mode: a
    pageable copy would wait for the step still running)."""
    if device.type != "cuda" or not pinned:
        return batch.to(device)
    from tbo_compiler.models.batch import Batch
    return Batch(*(t.pin_memory().to(device, non_blocking=True) for t in batch.args()),
                 batch.query_lens, batch.num_padding)


def _to_device_index(values: list[int], device, pinned: bool):
    t = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device)


@torch.no_grad()
def serve_loop(runs: dict, kv, reqs: list[Request], *, concurrency: int, token_budget: int, max_blocks: int,
               world: int = 1, device=torch.device("cpu"), barrier=None, overlap: bool = False) -> dict:
    """Serve this rank's `reqs` to completion, in step with the other ranks. `runs`: {"prefill":
    plan for mixed steps, "decode": plan for decode steps}. Returns the finished requests (times in
    seconds from the start) and the step counts.

    overlap=True: the host runs one step ahead of the GPU. A step's sampled ids stay on the device
    (the next step's decode rows are patched from them there) and reach the host while the next
    step runs; lengths decide completion (EOS is ignored), so the host never needs the values to
    plan. A token's time is when its value reached the host."""
    sched = Scheduler(reqs, kv, concurrency=concurrency, token_budget=token_budget, max_blocks=max_blocks)
    launched: _Launched | None = None
    steps = {"mixed": 0, "decode": 0, "idle": 0, "empty": 0, "real_tokens": 0, "padded_tokens": 0,
             "forward_s": 0.0, "host_s": 0.0}
    events: list = []
    if barrier:
        barrier()
    t0 = time.perf_counter()
    while True:
        t_host = time.perf_counter()
        now = t_host - t0
        # Step 1: admission
        sched.admit(now)
        # Step 2: this rank's candidate step
        dec, pre = sched.plan()
        flag, t_mixed, t_dec = agree_max([sched.flag(dec, pre), len(dec) + sum(len(n) for _, n, _ in pre),
                                          len(dec)], world)
        # Step 3: the agreed step
        if flag in (0, 1) and launched is not None:  # nothing to launch behind it: take its ids now
            launched.resolve(time.perf_counter() - t0)
            launched = None
        if flag == 0:
            break
        if flag == 1:
            steps["idle"] += 1
            nxt = sched.next_arrival()
            time.sleep(min(max(0.0, nxt - now), 0.002) if nxt is not None else 0.002)
            continue
        kind = "mixed" if flag == 3 else "decode"
        run = runs["prefill" if flag == 3 else "decode"]
        entries = dec + pre if flag == 3 else dec
        pad_to = bucket_of(run, t_mixed if flag == 3 else t_dec)
        patch_rows, patch_src = [], []  # decode rows whose token is still on the device
        reqs_new, row = [], 0
        for s, new, _ in entries:
            if new and isinstance(new[-1], _Pending):  # a decode entry: its one token
                patch_rows.append(row)
                patch_src.append(new[-1].row)
                new = [0]
            reqs_new.append((s.req.rid, new))
            row += len(new)
        batch = _to_device(kv.make_batch(reqs_new, pad_to=pad_to, max_blocks=max_blocks), device, overlap)
        if patch_rows:
            idx = _to_device_index(patch_rows, device, overlap)
            src = _to_device_index(patch_src, device, overlap)
            batch.input_ids.index_copy_(0, idx, launched.dev.index_select(0, src))
        t_fwd = time.perf_counter()
        if device.type == "cuda":  # the step's GPU time, read after the loop (no sync here)
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        logits = run(*batch.args(), kv.caches, copy_output=False)  # sampled below, before the next call
        if device.type == "cuda":
            ev[1].record()
            events.append(ev)
        # Step 4: greedy sampling of the rows that sample, then completion
        rows = [i for i, (_, _, samples) in zip(batch.last_token_index(), entries) if samples]
        if overlap:
            sampled_dev = logits.index_select(0, _to_device_index(rows, logits.device, True)).argmax(-1)
            placeholders = [_Pending(j) for j in range(len(rows))]
            t_done = time.perf_counter()
            sched.finish_step(entries, placeholders, t_done - t0)
            dests = [(s, len(s.tokens) - 1) for s, _, samples in entries if samples]
            previous, launched = launched, _Launched(sampled_dev, device, dests)
            if previous is not None:  # the step before: done, or finishing while this one is queued
                previous.resolve(time.perf_counter() - t0)
        else:
            sampled = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)].argmax(-1).tolist() \
                if rows else []
            if device.type == "cuda" and not rows:
                torch.cuda.synchronize()
            t_done = time.perf_counter()
            sched.finish_step(entries, sampled, t_done - t0)
        steps[kind] += 1
        real = batch.num_tokens - batch.num_padding
        steps["empty"] += real == 0
        steps["real_tokens"] += real
        steps["padded_tokens"] += pad_to - real
        # forward: the plan's call up to the sampled ids on the host; host: the rest of the step
        # (admission, agreement, building the batch, bookkeeping), when the GPU has nothing queued
        steps["forward_s"] += t_done - t_fwd
        steps["host_s"] += (t_fwd - t_host) + (time.perf_counter() - t_done)
    duration = time.perf_counter() - t0
    if events:  # GPU time of the plans' calls alone: what the steps would take if the host never lagged
        torch.cuda.synchronize()
        steps["gpu_s"] = sum(a.elapsed_time(b) for a, b in events) / 1e3
    leaked = (kv.num_blocks - 1) - free_blocks(kv)
    if leaked or sched.committed or sched.live:
        raise RuntimeError(f"KV cache: {leaked} blocks not freed, {len(sched.live)} requests still live")
    return {"requests": sched.done, "steps": steps, "duration": duration, "max_running": sched.max_live}


# Step 3: the numbers ------------------------------------------------------------------------

def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(name: str, xs: list[float]) -> dict:
    return {f"mean_{name}_ms": 1e3 * sum(xs) / len(xs) if xs else 0.0,
            f"median_{name}_ms": 1e3 * _pct(xs, 50), f"p99_{name}_ms": 1e3 * _pct(xs, 99)}


def summarize(per_rank: list[dict], world: int) -> dict:
    """Merge the ranks' results of one run into the fields serving benchmarks print."""
    reqs = sorted((r for pr in per_rank for r in pr["requests"]), key=lambda r: r["rid"])
    duration = max(pr["duration"] for pr in per_rank)
    steps = {k: sum(pr["steps"][k] for pr in per_rank) for k in per_rank[0]["steps"]}
    n_in = sum(r["input_len"] for r in reqs)
    n_out = sum(len(r["tokens"]) for r in reqs)
    ttft = [r["times"][0] - r["sent"] for r in reqs]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in reqs if len(r["times"]) > 1]
    itl = [b - a for r in reqs for a, b in zip(r["times"], r["times"][1:])]
    e2e = [r["times"][-1] - r["sent"] for r in reqs]
    rows = steps["real_tokens"] + steps["padded_tokens"]
    return {
        "successful_requests": len(reqs), "duration_s": duration, "num_gpus": world,
        "total_input_tokens": n_in, "total_generated_tokens": n_out,
        "request_throughput": len(reqs) / duration, "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "output_throughput_per_gpu": n_out / duration / world,
        "total_token_throughput_per_gpu": (n_in + n_out) / duration / world,
        **_stats("ttft", ttft), **_stats("tpot", tpot), **_stats("itl", itl), **_stats("e2e", e2e),
        "padded_token_share": steps["padded_tokens"] / rows if rows else 0.0,
        "host_share": steps["host_s"] / max(steps["host_s"] + steps["forward_s"], 1e-12),
        # the loop's cost: the share of the run the GPU was not running a step (GPU only); 1 minus
        # it is the throughput reached over what the measured step times allow
        "loop_cost": (1 - max(pr["steps"]["gpu_s"] / pr["duration"] for pr in per_rank)
                      if all("gpu_s" in pr["steps"] for pr in per_rank) else None),
        "steps": steps,
    }


TABLE = [("successful_requests", "Successful requests", "{:d}"), ("duration_s", "Benchmark duration (s)", "{:.2f}"),
         ("total_input_tokens", "Total input tokens", "{:d}"),
         ("total_generated_tokens", "Total generated tokens", "{:d}"),
         ("request_throughput", "Request throughput (req/s)", "{:.2f}"),
         ("output_throughput", "Output token throughput (tok/s)", "{:.1f}"),
         ("total_token_throughput", "Total token throughput (tok/s)", "{:.1f}"),
         ("output_throughput_per_gpu", "Output tok/s per GPU", "{:.1f}"),
         ("total_token_throughput_per_gpu", "Total tok/s per GPU", "{:.1f}"),
         ("mean_ttft_ms", "Mean TTFT (ms)", "{:.1f}"), ("median_ttft_ms", "Median TTFT (ms)", "{:.1f}"),
         ("p99_ttft_ms", "P99 TTFT (ms)", "{:.1f}"), ("mean_tpot_ms", "Mean TPOT (ms)", "{:.2f}"),
         ("median_tpot_ms", "Median TPOT (ms)", "{:.2f}"), ("p99_tpot_ms", "P99 TPOT (ms)", "{:.2f}"),
         ("mean_itl_ms", "Mean ITL (ms)", "{:.2f}"), ("median_itl_ms", "Median ITL (ms)", "{:.2f}"),
         ("p99_itl_ms", "P99 ITL (ms)", "{:.2f}"), ("padded_token_share", "Padded token share", "{:.1%}"),
         ("host_share", "Host share of step time", "{:.1%}"),
         ("loop_cost", "Loop cost (1 - GPU step time / duration)", "{:.1%}")]


def table(results: list[dict]) -> str:
    """Markdown: one column per (mode, concurrency)."""
    head = "| metric | " + " | ".join(f"{r['mode']} c={r['concurrency']}" for r in results) + " |"
    lines = [head, "|" + "---|" * (len(results) + 1)]
    for key, name, fmt in TABLE:
        lines.append(f"| {name} | " + " | ".join("-" if r.get(key) is None else fmt.format(r[key])
                                                  for r in results) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no plot")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in results):
        rs = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["concurrency"])
        ax.plot([r["concurrency"] for r in rs], [r["output_throughput_per_gpu"] for r in rs], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max concurrency")
    ax.set_ylabel("output tokens/s per GPU")
    ax.legend(title="TBO")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# Step 4: plans and models -------------------------------------------------------------------

def _pow2_upto(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return sorted(set(out + [hi]))


def setup(cfg: dict) -> dict:
    """Parent / rank 0: the model dir (a slice's config when --slice) and the two plans, compiled
    once into cfg["work_dir"]. Adds the paths and the bucket lists to cfg."""
    from tbo_compiler.compile import compile_model_dir

    work = Path(cfg["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    if cfg.get("slice"):
        import tbo_bench as tb

        cfg["model_dir"] = str(tb.write_slice(work / f"slice_{cfg['slice']}", cfg["ep"], cfg["slice"]))
    c_rank = -(-max(cfg["concurrency"]) // cfg["ep"])
    cfg["prefill_buckets"] = cfg.get("prefill_buckets") or _pow2_upto(min(64, cfg["token_budget"]), cfg["token_budget"])
    cfg["decode_buckets"] = cfg.get("decode_buckets") or _pow2_upto(1, c_rank)
    if max(cfg["prefill_buckets"]) < cfg["token_budget"] or max(cfg["decode_buckets"]) < c_rank:
        raise ValueError("the largest prefill bucket must hold the token budget, the largest decode bucket "
                         "the per-rank concurrency")
    cfg["max_blocks"] = -(-(cfg["input_len"] + cfg["output_len"]) // cfg["block_size"])
    profile = "h200" if torch.cuda.is_available() else "cpu"
    cfg["plans"] = {}
    for phase, counts in (("prefill", cfg["prefill_buckets"]), ("decode", cfg["decode_buckets"])):
        p = work / f"plan_{phase}_ep{cfg['ep']}.pt"
        t0 = time.perf_counter()
        compile_model_dir(cfg["model_dir"], p, ep=cfg["ep"], moe_comm="a2a", mode=phase, token_counts=counts,
                          profile=profile, block_size=cfg["block_size"], max_blocks=cfg["max_blocks"],
                          dtype=getattr(torch, cfg["dtype"]))
        print(f"compiled {p.name} ({counts}) in {time.perf_counter() - t0:.1f} s", flush=True)
        cfg["plans"][phase] = str(p)
    return cfg


def _model(cfg: dict, rank: int, world: int, device):
    """The weights: the checkpoint's when model_dir has them, else random (tbo_bench's init)."""
    from tbo_compiler.models import ParallelConfig, load_model

    dtype = getattr(torch, cfg["dtype"])
    if any(Path(cfg["model_dir"]).glob("*.safetensors")):
        return load_model(cfg["model_dir"], dtype=dtype, device=device, block_size=cfg["block_size"],
                          parallel=ParallelConfig(world, rank, "ep", "a2a"))
    import tbo_bench as tb

    return tb.random_model(cfg["model_dir"], rank, world, dtype, device, block_size=cfg["block_size"])


def rank_serve(rank: int, world: int, cfg: dict) -> list[dict]:
    """One rank: every (mode, concurrency) run over this rank's requests -> its raw results."""
    from tbo_compiler.plan import read_plan
    from tbo_compiler.runtime.plan_module import PlanModule
    try:
        from tbo_compiler.load import programs_of
    except ImportError:  # before load_plan moved to tbo_compiler/load.py
        from tbo_compiler.plan import programs_of

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model = _model(cfg, rank, world, device)
    vocab = model.config.vocab_size
    reqs = make_workload(cfg["num_requests"], cfg["input_len"], cfg["output_len"], vocab, seed=cfg["seed"],
                         request_rate=cfg.get("request_rate") or math.inf)
    mine = [r for r in reqs if r.rid % world == rank]
    plans = {k: read_plan(p) for k, p in cfg["plans"].items()}
    barrier = None
    if world > 1:
        import torch.distributed as dist
        barrier = dist.barrier
    # one cache for every run: CUDA graphs capture the cache tensors, a new cache is a new capture;
    # every run gives all its blocks back, and stale entries are never read (a request writes a
    # slot before any query of its attends to it)
    c_max = -(-max(cfg["concurrency"]) // world)
    kv = model.new_kv_cache(cfg.get("num_blocks") or c_max * cfg["max_blocks"] + 1, device=device)
    out = []
    for mode in cfg["modes"]:
        runs = {k: PlanModule(programs_of(p, device), model, device, ep=world, group="ep", policy=mode,
                              num_token_inputs=len(model.token_inputs), inductor=cfg.get("inductor", False))
                for k, p in plans.items()}
        if cfg.get("warmup", True):
            warm_up(runs, kv, cfg["max_blocks"], vocab, device)
        ov = cfg.get("overlap", False)
        overlaps = [False, True] if ov == "both" else [ov in (True, "on")]
        for conc in cfg["concurrency"]:
            for overlap in overlaps:  # "both": the same plans and cache, side by side
                res = serve_loop(runs, kv, mine, concurrency=-(-conc // world), token_budget=cfg["token_budget"],
                                 max_blocks=cfg["max_blocks"], world=world, device=device, barrier=barrier,
                                 overlap=overlap)
                res.update(mode=mode + ("+overlap" if overlap else ""), overlap=overlap,
                           concurrency=conc,
                           decisions={k: {b: d["variant"] for b, d in sorted(r.decisions.items())}
                                      for k, r in runs.items()})
                out.append(res)
        del runs
    return out


def merge(per_rank: list[list[dict]], world: int) -> list[dict]:
    """The ranks' raw results -> one summary per (mode, concurrency), rank 0's bucket decisions."""
    out = []
    for i, res0 in enumerate(per_rank[0]):
        s = summarize([pr[i] for pr in per_rank], world)
        out.append({"mode": res0["mode"], "concurrency": res0["concurrency"], **s, "decisions": res0["decisions"]})
    return out


# Step 5: the command line -------------------------------------------------------------------

def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="serve_bench.py", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="HF-style dir (config.json, weights if any: random weights without)")
    src.add_argument("--slice", choices=("deepseek_v3", "gpt_oss"), help="tbo_bench's 4-layer slice, random weights")
    ap.add_argument("--ep", type=int, default=None,
                    help="ranks; under torchrun its WORLD_SIZE, else spawned ranks (NCCL on GPUs, gloo on CPU)")
    ap.add_argument("--modes", default="serial,tbo,auto", help="TBO policies: serial (off), tbo (forced), auto")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--concurrency", default="32,64,128,256", help="max requests in flight (all ranks)")
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals (req/s); default all at once")
    ap.add_argument("--token-budget", type=int, default=2048, help="tokens per step per rank (chunked prefill)")
    ap.add_argument("--prefill-buckets", default="", help="default: powers of two from 64 to the token budget")
    ap.add_argument("--decode-buckets", default="", help="default: powers of two up to the per-rank concurrency")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="KV blocks per rank; default: every slot's full context")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--overlap", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                    help="the host plans one step ahead of the GPU (sampled ids stay on the device); "
                    "both: each concurrency without and with it, side by side")
    ap.add_argument("--inductor", action="store_true", help="compute regions compiled by Inductor (runtime's option)")
    ap.add_argument("--out", default="out/serve_bench")
    ap.add_argument("--work-dir", default=None, help="plans and slice configs (default: a temporary dir)")
    ap.add_argument("--plot", action="store_true", help="throughput vs concurrency per mode (needs matplotlib)")
    a = ap.parse_args(argv)
    modes = a.modes.split(",")
    if set(modes) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    return {"model_dir": a.model_dir, "slice": a.slice, "ep": a.ep, "modes": modes, "num_requests": a.num_requests,
            "input_len": a.input_len, "output_len": a.output_len, "concurrency": _ints(a.concurrency),
            "request_rate": a.request_rate, "token_budget": a.token_budget,
            "prefill_buckets": _ints(a.prefill_buckets), "decode_buckets": _ints(a.decode_buckets),
            "block_size": a.block_size, "num_blocks": a.num_blocks, "dtype": a.dtype, "seed": a.seed,
            "warmup": not a.no_warmup, "inductor": a.inductor, "overlap": a.overlap, "out": a.out,
            "work_dir": a.work_dir, "plot": a.plot,
            "command": _command(argv if argv is not None else sys.argv[1:])}


def _command(args) -> str:
    """The command line as a reader would retype it (for the results' table)."""
    ws = os.environ.get("WORLD_SIZE")
    head = f"torchrun --nproc-per-node {ws} bench/serve_bench.py" if ws else "python bench/serve_bench.py"
    return " ".join([head, *map(shlex.quote, args)])


def report(cfg: dict, results: list[dict]) -> None:
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in cfg.items() if k not in ("out",)}
    (out / "serve_bench.json").write_text(json.dumps({"config": meta, "results": results}, indent=1))
    md = f"`{cfg['command']}`\n\n{table(results)}\n"
    (out / "serve_bench.md").write_text(md)
    print(md)
    if cfg["plot"]:
        plot(results, out / "serve_bench_throughput.png")


def run(cfg: dict) -> list[dict]:
    """Compile, serve every (mode, concurrency) on cfg["ep"] ranks (spawned when > 1), summarise."""
    from tbo_compiler.runtime.launch import run_ranks

    cfg["ep"] = cfg["ep"] or 1
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        cfg["work_dir"] = cfg.get("work_dir") or tmp
        setup(cfg)
        if cfg["ep"] == 1:
            per_rank = [rank_serve(0, 1, cfg)]
        else:
            per_rank = run_ranks(rank_serve, cfg["ep"], cfg, backend="nccl" if torch.cuda.is_available() else "gloo")
    return merge(per_rank, cfg["ep"])


def main(argv=None) -> int:
    cfg = parse(argv)
    if "WORLD_SIZE" not in os.environ:   # one process, or ranks spawned here
        report(cfg, run(cfg))
        return 0
    import torch.distributed as dist

    from tbo_compiler.runtime.comm import register_group

    world = int(os.environ["WORLD_SIZE"])
    if cfg["ep"] not in (None, world):
        raise SystemExit(f"--ep {cfg['ep']} but torchrun started {world} ranks")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    register_group("ep", dist.group.WORLD)
    cfg["ep"] = world
    cfg["work_dir"] = cfg["work_dir"] or str(Path(cfg["out"]) / "work")
    if rank == 0:
        setup(cfg)
    box = [cfg]
    dist.broadcast_object_list(box, src=0)
    mine = rank_serve(rank, world, box[0])
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        report(box[0], merge(gathered, world))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
