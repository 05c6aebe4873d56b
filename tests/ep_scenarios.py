"""Expert-parallel scenarios for test_ep.py: run by every spawned rank (so importable by module
name: run_ranks pickles `rank_main` as `ep_scenarios.rank_main`, and spawn hands the parent's
sys.path, which holds tests/, to the children) and, at EP=1, by the parent for the references.

Serving schedule (5 engine steps; requests A-E belong to ranks 0..W-2 in turn, F to rank W-1):
  0  prefill  B[:4]                                   (B's cached prefix)
  1  prefill  A[:7], B[4:10] (after its prefix), C[:3], D[:5], E[:1]
  2  decode   A..E one token each;  prefill F[:6]     (rank W-1: prefill beside others' decode)
  3  decode   A..F
  4  decode   A..F
In the DP modes (a2a, allgather) a rank serves only its own requests, so rank W-1 has no real
token in steps 0-1 (its batch is all padding) and, at EP=4, ranks 0, 2, 3 idle in step 0. Every
rank pads to (max tokens over ranks) + EXTRA_PAD, so every rank holds padding rows. In allreduce
mode every rank serves every request (the EP=1 schedule) padded by EXTRA_PAD.

Routings (the same change on every rank and on the EP=1 reference):
  natural      the checkpoint's router
  low_experts  a +BIAS on experts 0-3: EP=2 rank 1 and EP=4 ranks 2, 3 receive no token
  one_expert   a +BIAS on expert HOT_EXPERT: every token picks it
DeepSeek-V3 takes the bias through its e_score_correction_bias; Qwen3-MoE's router has no bias,
so its weight gets a bias column and its input a ones column (the real router still routes).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tbo_compiler.models import ParallelConfig, load_model
from tbo_compiler.models.moe import MoEBlock

ARCHS = ("deepseek_v3", "qwen3_moe")
MODES = ("a2a", "allgather", "allreduce")
ROUTINGS = ("natural", "low_experts", "one_expert")
NUM_EXPERTS = 8
LOW_EXPERTS = range(4)
HOT_EXPERT = 5
BIAS = 10.0
BLOCK_SIZE = 4
NUM_BLOCKS = 64
EXTRA_PAD = 2

_LENS = {"A": 7 + 3, "B": 10 + 3, "C": 3 + 3, "D": 5 + 3, "E": 1 + 3, "F": 6 + 2}


def _tokens() -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(7)
    return {r: torch.randint(2, 256, (n,), generator=g).tolist() for r, n in _LENS.items()}


def owner(req: str, world: int) -> int:
    if world == 1:
        return 0
    return world - 1 if req == "F" else "ABCDE".index(req) % (world - 1)


def steps() -> list[list[tuple[str, list[int]]]]:
    """The global schedule: every request of every rank, step by step."""
    t = _tokens()
    out = [[("B", t["B"][:4])],
           [("A", t["A"][:7]), ("B", t["B"][4:10]), ("C", t["C"][:3]), ("D", t["D"][:5]), ("E", t["E"][:1])]]
    done = {"A": 7, "B": 10, "C": 3, "D": 5, "E": 1}
    for s in range(3):
        step = [(r, t[r][n:n + 1]) for r, n in done.items()]
        done = {r: n + 1 for r, n in done.items()}
        step.append(("F", t["F"][:6] if s == 0 else t["F"][5 + s:6 + s]))
        out.append(step)
    return out


def rank_steps(rank: int, world: int) -> list[list[tuple[str, list[int]]]]:
    return [[(r, toks) for r, toks in step if owner(r, world) == rank] for step in steps()]


# routing ------------------------------------------------------------------------------------

class OnesColumn(nn.Module):
    """Feeds the router [x | 1], so the last column of its weight acts as a per-expert bias."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    def forward(self, x_TD: Tensor):
        return self.router(torch.cat([x_TD, x_TD.new_ones(x_TD.shape[0], 1)], dim=-1))


def routing_bias(routing: str) -> Tensor:
    b = torch.zeros(NUM_EXPERTS)
    if routing == "low_experts":
        b[list(LOW_EXPERTS)] = BIAS
    elif routing == "one_expert":
        b[HOT_EXPERT] = BIAS
    return b


def moe_blocks(model) -> list[MoEBlock]:
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


@torch.no_grad()
def apply_routing(model, routing: str):
    bias = routing_bias(routing)
    for moe in moe_blocks(model):
        if hasattr(moe.gate, "e_score_correction_bias"):
            moe.gate.e_score_correction_bias.add_(bias)
        else:
            w = moe.gate.weight
            moe.gate.weight = nn.Parameter(torch.cat([w, bias.to(w.dtype)[:, None]], dim=1), requires_grad=False)
            moe.gate = OnesColumn(moe.gate)
    return model


def load(model_dir, routing: str, world: int = 1, rank: int = 0, mode: str = "a2a"):
    par = ParallelConfig(ep_size=world, ep_rank=rank, moe_comm=mode)
    model = load_model(model_dir, dtype=torch.float32, parallel=par, block_size=BLOCK_SIZE)
    return apply_routing(model, routing)


# serving ------------------------------------------------------------------------------------

@torch.no_grad()
def serve(model, step_list, pad_to=None):
    """Run the steps on one cache -> ({req: logits of its tokens}, [padding rows' logits per step]).

    `pad_to(num_tokens) -> rows` pads each step (None: no padding)."""
    kv = model.new_kv_cache(NUM_BLOCKS)
    out, pads = {}, []
    for step in step_list:
        n = sum(len(toks) for _, toks in step)
        b = kv.make_batch(step, pad_to=pad_to(n) if pad_to else None)
        logits = model(*b.args(), kv.caches)
        row = 0
        for req, toks in step:
            out.setdefault(req, []).append(logits[row:row + len(toks)])
            row += len(toks)
        pads.append(logits[row:])
    return {r: torch.cat(v) for r, v in out.items()}, pads


def _count_expert_rows(model, counter: list[int]):
    """Hooks counting the (token, expert) pairs this rank's experts compute (ids >= 0)."""
    def hook(_mod, args):
        counter[0] += int((args[1] >= 0).sum())
    return [moe.experts.register_forward_pre_hook(hook) for moe in moe_blocks(model)]


# the rank -----------------------------------------------------------------------------------

def rank_main(rank: int, world: int, model_dirs: dict[str, str]) -> dict:
    """Every scenario on this rank, in one process. -> {(arch, mode, routing): result}."""
    from tbo_compiler.runtime import comm

    results = {}
    for arch in ARCHS:
        for mode in MODES:
            for routing in ROUTINGS:
                model = load(model_dirs[arch], routing, world, rank, mode)
                counter = [0]
                hooks = _count_expert_rows(model, counter)
                agreed = []
                if mode == "allreduce":  # same batch everywhere
                    logits, pads = serve(model, steps(), pad_to=lambda n: n + EXTRA_PAD)
                else:
                    def pad_to(n):
                        agreed.append(comm.agree_num_tokens(n, "ep"))
                        return agreed[-1] + EXTRA_PAD
                    logits, pads = serve(model, rank_steps(rank, world), pad_to=pad_to)
                for h in hooks:
                    h.remove()
                results[(arch, mode, routing)] = dict(logits=logits, pads=pads, expert_rows=counter[0],
                                                      agreed=agreed)
    results["comm"] = comm_ops(rank, world)
    return results


# the comm ops on their own ------------------------------------------------------------------

COMM_T, COMM_D, COMM_K, COMM_I = 6, 8, 2, 4


def comm_inputs(rank: int):
    """Rank `rank`'s tokens and routing (token 0 picks only rank 0's experts, token 1 only the
    last rank's, at EP=2 and EP=4), and the full expert weights (the same on every rank)."""
    E = NUM_EXPERTS
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(COMM_T, COMM_D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:COMM_K] for _ in range(COMM_T)])
    ids[0] = torch.arange(COMM_K)
    ids[1] = E - 1 - torch.arange(COMM_K)
    w = torch.rand(COMM_T, COMM_K, generator=g)
    gw = torch.Generator().manual_seed(99)
    w13 = torch.randn(E, 2 * COMM_I, COMM_D, generator=gw) * 0.3
    w2 = torch.randn(E, COMM_D, COMM_I, generator=gw) * 0.3
    return x, ids, w, w13, w2


def comm_ops(rank: int, world: int) -> dict:
    """dispatch -> this rank's experts -> combine, and the plain collectives, on known inputs."""
    from tbo_compiler.ops import comm as comm_ops_
    from tbo_compiler.ops.kernels import unpack_meta
    from tbo_compiler.runtime import comm

    x, ids, w, w13, w2 = comm_inputs(rank)
    e_loc = NUM_EXPERTS // world
    lo = rank * e_loc
    rx, rmeta = comm_ops_.dispatch(*torch.ops.tbo.dispatch_pack(x, ids, w, world, e_loc), "ep", world)
    rids, rw = unpack_meta(rmeta, ids.shape[1])
    ry = torch.ops.tbo.moe_experts(rx, rids, rw, w13[lo:lo + e_loc], w2[lo:lo + e_loc])
    y = comm_ops_.combine(ry, "ep", world).view(world, COMM_T, -1).sum(0)
    stacked = torch.arange(world * COMM_T * 3, dtype=torch.float32).view(world * COMM_T, 3) * (rank + 1)
    return dict(recv=(rx, rids.long(), rw), y=y,
                all_gather=comm_ops_.all_gather(x, "ep", world),
                reduce_scatter=comm_ops_.reduce_scatter(stacked, "ep", world),
                all_reduce=comm_ops_.all_reduce(x, "ep", world),
                pending=comm.pending_count())
