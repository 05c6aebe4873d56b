"""Models this project did not write, for the `backend="tbo"` tests: HuggingFace `transformers`
MoE classes (tiny configs, random init) and three expert-/tensor-parallel models written only with
torch and torch.distributed._functional_collectives. Importable by spawned ranks."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from tbo_compiler.passes.pipeline import TboFallbackWarning

# HuggingFace transformers ---------------------------------------------------------------------

HF_MODELS = ("qwen3_moe", "mixtral", "deepseek_v3")
#: with their default implementations (grouped_mm experts, eager/sdpa attention) all four split
HF_DEFAULT_MODELS = HF_MODELS + ("gpt_oss",)


def hf_model(name: str, experts_implementation: str | None = None, seed: int = 0):
    """A tiny `transformers` model, random init, fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if name == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                head_dim=16, decoder_sparse_step=1)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif name == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    elif name == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, moe_intermediate_size=32,
                                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                  first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
        model = tf.DeepseekV3ForCausalLM(cfg)
    elif name == "gpt_oss":  # attention sinks, biased experts, alternating sliding-window layers
        cfg = tf.GptOssConfig(**{**common, "intermediate_size": 32}, head_dim=16, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=4)
        model = tf.GptOssForCausalLM(cfg)
    else:
        raise ValueError(name)
    if experts_implementation:
        model.config._experts_implementation = experts_implementation
    return model.eval()


def compile_tbo(model, **options):
    """torch.compile(model, backend="tbo") that records each compiled graph's pipeline state and
    the fallback warnings it gave."""
    seen, warned = [], []
    torch._dynamo.reset()
    fn = torch.compile(model, backend="tbo", dynamic=False, options={"on_compile": seen.append, **options})

    def call(*a, **kw):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = fn(*a, **kw)
        warned.extend(str(x.message) for x in w if issubclass(x.category, TboFallbackWarning))
        return out

    return call, seen, warned


def report(seen) -> list[dict]:
    """What each compiled graph did: tokens, cut, comm ops found, fallback reason."""
    return [{"T": c.T, "cut": c.cut, "comm": len(c.comm_before.ops), "fallback": c.fallback} for c in seen]


def comm_beside_other_compute(c) -> int:
    """How many comm ops of the split graph have compute of the other ubatch scheduled between
    their start and the first op that needs their result."""
    nodes = {n.name: n for n in c.gm.graph.nodes}
    order = [i for i in c.schedule.instrs if i.op == "run"]
    pos = {i.node: k for k, i in enumerate(order)}
    hits = 0
    for op in c.comm.ops:
        users = [pos[u.name] for u in nodes[op.wait].users if u.name in pos]
        first_use = min(users) if users else len(order)
        between = [nodes[order[k].node] for k in range(pos[op.start] + 1, first_use)]
        if any(n.meta.get("tbo_ubatch") == 1 - op.ubatch and n.meta.get("tbo_stream") == "compute"
               for n in between):
            hits += 1
    return hits


# expert parallel on all_to_all_single (torchtitan-style dispatch/combine) ---------------------

def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


class A2AMoE(nn.Module):
    """EP MoE: every rank holds experts/W experts; a token's hidden state and routing go to every
    rank with one all_to_all_single (static shapes: [W*T] rows), each rank runs its experts, and
    a second all_to_all_single brings the partial outputs home, summed over ranks."""

    def __init__(self, world, rank, dim=16, experts=4, topk=2, layers=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.world, self.topk, self.layers = world, topk, layers
        self.e_loc, self.lo = experts // world, rank * (experts // world)
        self.norm = nn.Parameter(torch.ones(layers, dim))
        self.gate = nn.Parameter(torch.randn(layers, experts, dim, generator=g) * 0.3)
        sl = slice(self.lo, self.lo + self.e_loc)
        self.w1 = nn.Parameter((torch.randn(layers, experts, 2 * dim, dim, generator=g) * 0.2)[:, sl].clone())
        self.w2 = nn.Parameter((torch.randn(layers, experts, dim, 2 * dim, generator=g) * 0.2)[:, sl].clone())

    def forward(self, x):
        W, T, D = self.world, x.shape[0], x.shape[1]
        group = dist.group.WORLD
        for l in range(self.layers):
            h = _rms(x, self.norm[l])
            w, ids = torch.topk((h @ self.gate[l].t()).softmax(-1), self.topk, dim=-1)
            send = torch.cat([h, w, ids.to(h.dtype)], -1).repeat(W, 1)          # [W*T, D+2k]
            recv = funcol.all_to_all_single(send, [T] * W, [T] * W, group)       # dispatch
            hr, wr, idr = recv.split([D, self.topk, self.topk], -1)
            y = torch.zeros_like(hr)
            for e in range(self.e_loc):
                we = (wr * (idr == self.lo + e)).sum(-1, keepdim=True)
                y = y + we * (torch.relu(hr @ self.w1[l, e].t()) @ self.w2[l, e].t())
            back = funcol.all_to_all_single(y, [T] * W, [T] * W, group)          # combine
            x = x + back.view(W, T, D).sum(0)
        return x


# LayerNorm, stack, in-forward constants, einsum; tensor parallel with all_reduce --------------

class MiscTP(nn.Module):
    """Two experts mixed by a softmax gate, their hidden dim sharded over the ranks (tensor
    parallel, all_reduce of the partial sums), with nn.LayerNorm, torch.stack, a constant made in
    forward and einsum."""

    def __init__(self, world, rank, dim=16, hidden=32, layers=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = layers
        self.ln = nn.ModuleList([nn.LayerNorm(dim) for _ in range(layers)])
        h = hidden // world
        sl = slice(rank * h, (rank + 1) * h)
        self.gate = nn.Parameter(torch.randn(layers, 2, dim, generator=g) * 0.3)
        self.w_in = nn.Parameter((torch.randn(layers, 2, hidden, dim, generator=g) * 0.2)[:, :, sl].clone())
        self.w_out = nn.Parameter((torch.randn(layers, 2, dim, hidden, generator=g) * 0.2)[:, :, :, sl].clone())

    def forward(self, x):
        for l in range(self.layers):
            h = self.ln[l](x)
            mix = torch.tensor([1.0, 0.5])                                       # a constant in forward
            p = torch.softmax(torch.einsum("td,ed->te", h, self.gate[l]), -1) * mix
            a = torch.einsum("td,ehd->teh", h, self.w_in[l])
            outs = torch.stack([torch.relu(a[:, 0]), torch.sigmoid(a[:, 1]) * a[:, 1]], 1)  # [T, 2, H/W]
            part = torch.einsum("te,teh,edh->td", p, outs, self.w_out[l])
            x = x + funcol.all_reduce(part, "sum", dist.group.WORLD)
        return x


MODELS = {"a2a": A2AMoE, "misc": MiscTP}


def _funcol_moe(world, rank):
    import funcol_moe
    return funcol_moe.FuncolMoE(world, rank)


def rank_check(rank, world, name, T, grad=False, strict=False):
    """One rank: eager vs backend="tbo" on the same input; returns the comparison and the report."""
    torch.manual_seed(100 + rank)
    m = _funcol_moe(world, rank) if name == "funcol" else MODELS[name](world, rank)
    x = torch.randn(T, 16)
    fn, seen, warned = compile_tbo(m, strict=strict)
    if grad:
        xr = x.clone().requires_grad_(True)
        ref = m(xr)
        ref.square().sum().backward()
        ref_grads = [xr.grad] + [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        xt = x.clone().requires_grad_(True)
        out = fn(xt)
        out.square().sum().backward()
        grads = [xt.grad] + [p.grad for p in m.parameters()]
        gdiff = max(float((a - b).abs().max()) for a, b in zip(ref_grads, grads))
    else:
        with torch.no_grad():
            ref, out = m(x), fn(x)
        gdiff = None
    return {"diff": float((out - ref).abs().max()), "scale": float(ref.abs().max()), "grad_diff": gdiff,
            "report": report(seen), "warned": warned,
            "kinds": sorted(op.kind for c in seen for op in c.comm_before.ops),
            "beside": [comm_beside_other_compute(c) for c in seen if c.cut],
            "split_comm": [len(c.comm.ops) for c in seen if c.cut]}


class RankDependent(nn.Module):
    """Rank 1 sorts its tokens (mixes them) before the all_reduce; rank 0 does not: rank 1 cannot
    split, so no rank may."""

    def __init__(self, rank):
        super().__init__()
        self.rank = rank
        self.w = nn.Parameter(torch.eye(16) * 0.5)

    def forward(self, x):
        h = x @ self.w
        if self.rank == 1:
            h = h.sort(0)[0]
        return x + funcol.all_reduce(h, "sum", dist.group.WORLD)


def rank_dependent_check(rank, world, T, strict):
    torch.manual_seed(7)
    m = RankDependent(rank)
    x = torch.randn(T, 16)
    fn, seen, warned = compile_tbo(m, strict=strict)
    try:
        with torch.no_grad():
            out = fn(x)
    except Exception as e:  # strict: every rank raises the same error
        return {"error": " ".join(str(e).split())}
    with torch.no_grad():
        ref = m(x)
    return {"diff": float((out - ref).abs().max()), "report": report(seen), "warned": warned}


class UnevenA2A(nn.Module):
    """Ranks hold different token counts (all ranks know them): rank r sends its rows to every
    rank and gets every rank's rows back with all_to_all_single split sizes."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes = sizes
        self.w = nn.Parameter(torch.eye(16) * 0.5)

    def forward(self, x):
        W, T = len(self.sizes), x.shape[0]
        recv = funcol.all_to_all_single((x @ self.w).repeat(W, 1), list(self.sizes), [T] * W, dist.group.WORLD)
        y = torch.tanh(recv)
        back = funcol.all_to_all_single(y, [T] * W, list(self.sizes), dist.group.WORLD)
        return x + back.view(W, T, -1).sum(0)


def uneven_check(rank, world, sizes):
    torch.manual_seed(3 + rank)
    m = UnevenA2A(sizes)
    x = torch.randn(sizes[rank], 16)
    fn, seen, warned = compile_tbo(m)
    with torch.no_grad():
        out, ref = fn(x), m(x)
    return {"diff": float((out - ref).abs().max()), "report": report(seen), "warned": warned}
