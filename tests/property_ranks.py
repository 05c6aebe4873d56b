"""Property test of TBO against no-TBO on random batch compositions: the examples, the harness
that runs one, and the hypothesis loop. Used by test_properties.py in the pytest process (EP=1)
and by every spawned rank (EP=2; importable by module name, like ep_scenarios.py).

An example (`Case`) is one engine step under test, possibly after a prefill of cached prefixes:
  mode     prefill (any lengths), decode (1 token a request), mtp (2 tokens a request)
  routing  natural | low_experts (every token to experts 0-3: EP=2 rank 1 receives none) |
           one_expert (every token picks expert HOT_EXPERT); ep_scenarios' router bias
  ranks    per rank, its requests as (prefix, new): `prefix` tokens are prefilled first (one
           prefill step of every request with a prefix, through both paths), then the step
           under test feeds `new` tokens (0-64 requests a rank: 0 is an empty local batch)
  seed     the token ids
Both paths run the same steps on fresh caches: the plan (policy "tbo": the two-ubatch program)
pads each step to its smallest bucket holding the largest rank's token count; the eager model
(no TBO) gets the same batch padded only to that count (what the ranks' MoE exchange needs; at
EP=1 no padding), so the comparison also shows the bucket's padding rows change no real row.
Compared: the real rows' logits of every step and, after the example, the KV caches (every block
but the null block, which padding rows write). Error of a value: |tbo - eager| / (ATOL + RTOL *
|eager|), NaN counting as infinite; an example passes at <= 1.

EP=2: both ranks run the hypothesis loop with derandomize=True, so they draw the same examples;
each example holds both ranks' batches and each rank serves its own. The pass/fail outcome is the
max error over ranks (one all-reduce), so both ranks fail, and shrink, identically.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ep_scenarios import apply_routing, moe_blocks

ATOL = 1e-4
RTOL = 1e-4
ROUTINGS = ("natural", "low_experts", "one_expert")
MODES = ("prefill", "decode", "mtp")
NUM_EXPERTS = 8          # ep_scenarios' router bias is over 8 experts
BLOCK_SIZE = 8
MAX_CONTEXT = 512        # a request's tokens after the step (prefix + new)
MAX_BLOCKS = MAX_CONTEXT // BLOCK_SIZE
MAX_REQUESTS = 64
PREFILL_BUDGET = 512     # tokens of one rank in one prefill step (the largest prefill bucket)
CAPS = (8, 32, 96, 256, PREFILL_BUDGET)   # a step's token budget is drawn in 1..cap: mostly small steps
NUM_BLOCKS = 2 * PREFILL_BUDGET // BLOCK_SIZE + MAX_REQUESTS + 1   # worst case of one example
# buckets: every one >= 2 requests, so every bucket has a TBO program (cut > 0)
PLANS = {"prefill": dict(mode="prefill", token_counts=(8, 32, 96, 256, 512), tokens_per_request=1),
         "decode": dict(mode="decode", token_counts=(2, 8, 24, 64), tokens_per_request=1),
         "mtp": dict(mode="decode", token_counts=(4, 16, 48, 128), tokens_per_request=2)}
NEW_TOKENS = {"decode": 1, "mtp": 2}


def compile_plans(model_dir, out_dir, ep: int) -> dict[str, str]:
    """One fp32 plan per mode (buckets above) -> {mode: path}."""
    from tbo_compiler.compile import compile_model_dir

    paths = {}
    for name, kw in PLANS.items():
        p = out_dir / f"prop_{name}_ep{ep}.pt"
        compile_model_dir(model_dir, p, ep=ep, moe_comm="a2a", dtype=torch.float32, block_size=BLOCK_SIZE,
                          max_blocks=MAX_BLOCKS, profile="cpu", **kw)
        paths[name] = str(p)
    return paths


# examples -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    mode: str
    routing: str
    seed: int
    ranks: tuple[tuple[tuple[int, int], ...], ...]   # per rank: (prefix, new) per request

    def steps(self, rank: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
        """This rank's steps: [(plan, [(request, first position, tokens)])]; the prefix step is
        there when any rank has a prefix (every rank takes part in every step, maybe empty)."""
        reqs = self.ranks[rank]
        out = []
        if any(p for r in self.ranks for p, _ in r):
            out.append(("prefill", [(f"r{i}", 0, p) for i, (p, _) in enumerate(reqs) if p]))
        out.append((self.mode, [(f"r{i}", p, n) for i, (p, n) in enumerate(reqs)]))
        return out

    def digest(self) -> int:
        return int.from_bytes(hashlib.sha256(repr(self).encode()).digest()[:6], "little")  # exact in float64


def _trim(wanted: list[int], budget: int, floor: int) -> list[int]:
    """Cut the drawn lengths, in order, so they sum to <= budget with each >= floor."""
    out, left = [], budget
    for i, w in enumerate(wanted):
        keep = floor * (len(wanted) - i - 1)
        out.append(max(floor, min(w, left - keep)))
        left -= out[-1]
    return out


def cases(world: int):
    """Hypothesis strategy of Case for `world` ranks."""
    from hypothesis import strategies as st

    def _length(lo: int, hi: int):   # the longest length on its own too: full contexts are an edge
        return st.one_of(st.integers(lo, hi), st.just(hi))

    @st.composite
    def _budget(draw):   # tokens of a step: up to a cap, or the cap (a bucket filled without padding)
        return draw(_length(1, draw(st.sampled_from(CAPS))))

    @st.composite
    def rank_requests(draw, mode: str):
        n = draw(st.one_of(st.integers(0, 4), st.integers(0, MAX_REQUESTS)))   # a few long ones, or many
        if mode == "prefill":
            new = _trim([draw(_length(1, MAX_CONTEXT)) for _ in range(n)], max(draw(_budget()), n), 1)
        else:
            new = [NEW_TOKENS[mode]] * n
        prefix_budget = draw(_budget())
        cached = [draw(_length(1, MAX_CONTEXT - k)) if k < MAX_CONTEXT and draw(st.booleans()) else 0
                  for k in new]
        return tuple(zip(_trim(cached, prefix_budget, 0), new))

    @st.composite
    def case(draw):
        mode = draw(st.sampled_from(MODES))
        routing = draw(st.sampled_from(ROUTINGS))
        ranks = tuple(draw(rank_requests(mode)) for _ in range(world))
        return Case(mode, routing, draw(st.integers(0, 2 ** 16)), ranks)

    return case()


# the harness --------------------------------------------------------------------------------

@dataclass
class Stats:
    examples: int = 0
    worst: float = 0.0              # max normalised error (<= 1 passes)
    worst_abs: float = 0.0          # max |tbo - eager| over logits and caches
    modes: dict = field(default_factory=dict)
    routings: dict = field(default_factory=dict)
    tbo_steps: int = 0              # steps whose bucket ran the TBO program (cut > 0)
    serial_steps: int = 0
    both_real: int = 0              # steps under test with real tokens in both ubatches (this rank)
    empty_rank: int = 0             # examples where this rank's batch was empty
    cached: int = 0                 # examples with a prefix step
    buckets: dict = field(default_factory=dict)   # (plan, bucket) -> steps


class Harness:
    """One rank's eager model and plans (policy "tbo"), with switchable routing."""

    def __init__(self, model_dir, plan_paths: dict, rank: int = 0, world: int = 1):
        from tbo_compiler import load_plan
        from tbo_compiler.models import ParallelConfig, load_model

        self.rank, self.world = rank, world
        self.model = load_model(model_dir, dtype=torch.float32, block_size=BLOCK_SIZE,
                                parallel=ParallelConfig(world, rank, "ep", "a2a"))
        self.plans = {k: load_plan(p, model_dir, rank=rank, dtype=torch.float32, policy="tbo")
                      for k, p in plan_paths.items()}
        self.vocab = self.model.config.vocab_size
        self._models = [self.model, *(p.model for p in self.plans.values())]
        self._bias0 = [[m.gate.e_score_correction_bias.clone() for m in moe_blocks(x)] for x in self._models]
        assert all(len(b) for b in self._bias0), "the routing skew needs DeepSeek-style correction biases"
        self.routing = "natural"
        self.stats = Stats()

    @torch.no_grad()
    def set_routing(self, routing: str) -> None:
        """The checkpoint's router biases, then ep_scenarios' skew (in place: the plans' programs
        read the same tensors)."""
        if routing == self.routing:
            return
        for model, biases in zip(self._models, self._bias0):
            for moe, b in zip(moe_blocks(model), biases):
                moe.gate.e_score_correction_bias.copy_(b)
            apply_routing(model, routing)
        self.routing = routing

    def _tokens(self, case: Case) -> dict[str, list[int]]:
        g = torch.Generator().manual_seed(case.seed * 4 + self.rank)
        return {f"r{i}": torch.randint(1, self.vocab, (p + n,), generator=g).tolist()
                for i, (p, n) in enumerate(case.ranks[self.rank])}

    @torch.no_grad()
    def run(self, case: Case) -> tuple[float, float]:
        """Both paths over the case's steps -> (max normalised error, max abs difference) on this rank."""
        self.set_routing(case.routing)
        toks = self._tokens(case)
        kv_ref, kv_tbo = self.model.new_kv_cache(NUM_BLOCKS), self.model.new_kv_cache(NUM_BLOCKS)
        worst, worst_abs = 0.0, 0.0
        all_steps = [case.steps(r) for r in range(len(case.ranks))]
        for i, (plan_name, reqs) in enumerate(all_steps[self.rank]):
            step = [(name, toks[name][start:start + n]) for name, start, n in reqs]
            T = sum(n for _, _, n in reqs)
            T_all = max(sum(n for _, _, n in s[i][1]) for s in all_steps)
            plan = self.plans[plan_name]
            bucket = min(b for b in plan.buckets if b >= T_all)
            # no-TBO pads only to the ranks' common count (EP=1: no padding; 0 when all are empty),
            # the plan to its bucket
            b_ref = kv_ref.make_batch(step, max_blocks=MAX_BLOCKS, pad_to=T_all)
            ref = self.model(*b_ref.args(), kv_ref.caches)
            out = plan(*kv_tbo.make_batch(step, max_blocks=MAX_BLOCKS).args(), kv_tbo.caches)
            assert out.shape == (T, self.vocab), (out.shape, T)
            w, a = _error(out, ref[:T])
            worst, worst_abs = max(worst, w), max(worst_abs, a)
            self._count_step(plan, plan_name, bucket, T, last=i == len(all_steps[self.rank]) - 1)
        for c_ref, c_tbo in zip(kv_ref.caches, kv_tbo.caches):   # block 0: the padding rows' null block
            w, a = _error(c_tbo[BLOCK_SIZE:], c_ref[BLOCK_SIZE:])
            worst, worst_abs = max(worst, w), max(worst_abs, a)
        s = self.stats
        s.examples += 1
        s.modes[case.mode] = s.modes.get(case.mode, 0) + 1
        s.routings[case.routing] = s.routings.get(case.routing, 0) + 1
        s.empty_rank += not case.ranks[self.rank]
        s.cached += len(all_steps[self.rank]) > 1
        return worst, worst_abs

    def _count_step(self, plan, plan_name: str, bucket: int, T: int, last: bool) -> None:
        s = self.stats
        ran = plan.decisions[bucket]["variant"]
        cut = plan.buckets[bucket][ran][0].cut
        if ran == "tbo" and cut > 0:
            s.tbo_steps += 1
        else:
            s.serial_steps += 1
        s.both_real += last and 0 < cut < T
        s.buckets[(plan_name, bucket)] = s.buckets.get((plan_name, bucket), 0) + 1


def _error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    if got.numel() == 0:
        return 0.0, 0.0
    d = (got.float() - want.float()).abs().nan_to_num(nan=float("inf"))  # a NaN fails on every rank
    return float((d / (ATOL + RTOL * want.float().abs())).max()), float(d.max())


# the property -------------------------------------------------------------------------------

def _global_max(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def check_property(h: Harness, max_examples: int) -> Stats:
    """Run the hypothesis loop on this rank; raises (with the falsifying example printed) when an
    example's TBO logits or caches differ from no-TBO beyond the tolerance."""
    from hypothesis import given, settings

    world = h.world

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None, print_blob=True)
    @given(case=cases(world))
    def tbo_equals_eager(case: Case):
        if world > 1:  # the ranks drew the same example (else they would desynchronise)
            d = case.digest()
            lo, hi = _global_max([-d, d], world)
            assert -lo == hi == d, f"rank {h.rank} drew another example than its peers"
        worst, worst_abs = h.run(case)
        worst, worst_abs = _global_max([worst, worst_abs], world)
        h.stats.worst, h.stats.worst_abs = max(h.stats.worst, worst), max(h.stats.worst_abs, worst_abs)
        assert worst <= 1.0, (f"TBO differs from no-TBO: max |tbo - eager| = {worst_abs:.3g}, "
                              f"{worst:.3g}x the tolerance (atol {ATOL}, rtol {RTOL})")

    tbo_equals_eager()
    return h.stats


def rank_main(rank: int, world: int, model_dir: str, plan_paths: dict, max_examples: int) -> Stats:
    """A spawned rank: its harness and the hypothesis loop -> its Stats."""
    return check_property(Harness(model_dir, plan_paths, rank, world), max_examples)
