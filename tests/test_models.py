"""Model numerics: batched paged serving equals one full forward per request; MLA's absorbed form
equals the textbook one; routers equal per-token loops; models trace; padding is inert."""
import dataclasses
import math

import pytest
import torch

from tbo_compiler.models import load_model
from tbo_compiler.models.deepseek_v3 import GroupLimitedGreedyRouter, NoAuxTCRouter
from tbo_compiler.models.qwen3_moe import SoftmaxTopkRouter

import tbo_scenarios as sc

ARCHS = ["deepseek_v3", "deepseek_v2", "kimi_k25", "qwen3_moe"]
MLA_ARCHS = ["deepseek_v3", "deepseek_v2", "kimi_k25"]
ATOL = 1e-4


def _tokens(n, seed):
    return torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _schedule():
    """Requests A, B, C; B's first 4 tokens are prefilled a step early (a cached prefix); then
    3 decode steps and one MTP-like step of 2-3 tokens per request."""
    seq = {"A": _tokens(7 + 3 + 2, 1), "B": _tokens(10 + 3 + 3, 2), "C": _tokens(3 + 3 + 2, 3)}
    prompt = {"A": 7, "B": 10, "C": 3}
    steps = [[("B", seq["B"][:4])],
             [("A", seq["A"][:7]), ("B", seq["B"][4:10]), ("C", seq["C"][:3])]]
    done = dict(prompt)
    for _ in range(3):
        steps.append([(r, seq[r][done[r]:done[r] + 1]) for r in ("C", "A", "B")])  # order varies
        done = {r: n + 1 for r, n in done.items()}
    steps.append([(r, seq[r][done[r]:]) for r in ("A", "B", "C")])
    return seq, steps


# (a) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_paged_steps_match_full_forward(tiny_models, arch):
    model = tiny_models[arch]
    seq, steps = _schedule()
    served = sc.serve(model, steps)
    for req, toks in seq.items():
        full = sc.serve(model, [[(req, toks)]])[req]
        assert served[req].shape == full.shape == (len(toks), model.config.vocab_size)
        torch.testing.assert_close(served[req], full, atol=ATOL, rtol=0)
    # the logits are not trivially equal (e.g. constant): rows differ across positions
    assert (full[1:] - full[:-1]).abs().max() > 0.1


# (b) ------------------------------------------------------------------------------------------

def _yarn_ref(cfg):
    """Independent yarn: (inv_freq, softmax scale) from the DeepSeek formulas."""
    d, base, sc = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
    exps = torch.arange(0, d, 2, dtype=torch.float64) / d
    fast, slow = base ** -exps, base ** -exps / sc["factor"]

    def dim_of(rot):  # the rope dim whose wavelength fits `rot` turns in the original context
        return d * math.log(sc["original_max_position_embeddings"] / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = max(math.floor(dim_of(sc["beta_fast"])), 0), min(math.ceil(dim_of(sc["beta_slow"])), d - 1)
    hi = hi + 0.001 if hi == lo else hi
    ramp = torch.tensor([min(max((i - lo) / (hi - lo), 0.0), 1.0) for i in range(d // 2)], dtype=torch.float64)
    inv_freq = slow * ramp + fast * (1 - ramp)
    m = 0.1 * sc["mscale_all_dim"] * math.log(sc["factor"]) + 1
    return inv_freq.float(), (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * m * m


def _rope_complex(x, pos, inv_freq):
    """Interleaved rope as a complex product: pairs (x[2i], x[2i+1]) are one complex number."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    rot = torch.polar(torch.ones(len(pos), len(inv_freq)), pos.float()[:, None] * inv_freq)
    rot = rot.view(len(pos), *([1] * (x.dim() - 2)), -1)
    return torch.view_as_real(xc * rot).flatten(-2)


@pytest.mark.parametrize("arch", MLA_ARCHS)
@torch.no_grad()
def test_mla_absorbed_equals_decompressed(tiny_models, arch):
    model = tiny_models[arch]
    cfg, attn = model.config, model.layers[0].self_attn
    H, N, R, Dv, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    T = 11
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    kv = model.new_kv_cache(16)
    b = kv.make_batch([("r", list(range(T)))])
    got = attn(x, b.positions, b.slot_mapping, b.block_table, kv.caches[0], model.rope)

    # textbook MLA: decompress per-head K and V from the latent, causal softmax attention
    inv_freq, scale = _yarn_ref(cfg)
    pos = torch.arange(T)
    if cfg.q_lora_rank:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    else:
        q = attn.q_proj(x)
    q_nope, q_pe = q.view(T, H, N + R).split([N, R], -1)
    c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([C, R], -1)
    k_nope, v = attn.kv_b_proj(attn.kv_a_layernorm(c_kv)).view(T, H, N + Dv).split([N, Dv], -1)
    k_pe = _rope_complex(k_pe, pos, inv_freq)
    k = torch.cat([k_nope, k_pe[:, None].expand(T, H, R)], -1)
    qf = torch.cat([q_nope, _rope_complex(q_pe, pos, inv_freq)], -1)
    s = torch.einsum("thd,shd->hts", qf, k) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hts,shd->thd", s.softmax(-1), v)
    want = attn.o_proj(o.reshape(T, H * Dv))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert attn.scale == pytest.approx(scale)


# (c) ------------------------------------------------------------------------------------------

def _router_inputs(cfg, T=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = getattr(cfg, "n_routed_experts", None) or cfg.num_experts
    return torch.randn(T, cfg.hidden_size, generator=g), torch.randn(E, cfg.hidden_size, generator=g) * 0.3, g


def _loop_route(x, W, *, score, bias, n_group, topk_group, group_score, k, norm, eps, scaling):
    """Per-token reference: a plain Python loop over tokens, groups and experts."""
    E, per = W.shape[0], W.shape[0] // n_group
    ids, ws = [], []
    for t in range(x.shape[0]):
        logits = [float(x[t].double() @ W[e].double()) for e in range(E)]
        if score == "sigmoid":
            s = [1 / (1 + math.exp(-z)) for z in logits]
        else:
            z = [math.exp(v - max(logits)) for v in logits]
            s = [v / sum(z) for v in z]
        choice = [s[e] + bias[e] for e in range(E)]
        gs = [group_score(sorted(choice[g * per:(g + 1) * per], reverse=True)) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -gs[g])[:topk_group]
        cands = [e for e in range(E) if e // per in kept]
        chosen = sorted(cands, key=lambda e: -choice[e])[:k]
        w = [s[e] for e in chosen]
        if norm:
            w = [v / (sum(w) + eps) for v in w]
        ids.append(chosen)
        ws.append([v * scaling for v in w])
    return torch.tensor(ids), torch.tensor(ws, dtype=torch.float32)


def _check_router(router, x, want_ids, want_w):
    ids, w = router(x)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    torch.testing.assert_close(w, want_w, atol=1e-5, rtol=1e-5)


def test_noaux_tc_router_matches_loop(tiny_models):
    cfg = dataclasses.replace(tiny_models["deepseek_v3"].config, n_routed_experts=16, n_group=4,
                              topk_group=2, num_experts_per_tok=4)
    x, W, g = _router_inputs(cfg)
    bias = torch.randn(16, generator=g) * 0.2
    r = NoAuxTCRouter(cfg)
    r.weight.data.copy_(W)
    r.e_score_correction_bias.data.copy_(bias)
    kw = dict(score="sigmoid", n_group=4, topk_group=2, group_score=lambda v: v[0] + v[1], k=4,
              norm=True, eps=1e-20, scaling=cfg.routed_scaling_factor)
    want_ids, want_w = _loop_route(x, W, bias=bias.tolist(), **kw)
    _check_router(r, x, want_ids, want_w)
    # the bias and the group limit both change some choices (else this test could not fail on them)
    no_bias, _ = _loop_route(x, W, bias=[0.0] * 16, **kw)
    no_groups, _ = _loop_route(x, W, bias=bias.tolist(), **{**kw, "n_group": 1, "topk_group": 1})
    assert not torch.equal(no_bias, want_ids) and not torch.equal(no_groups, want_ids)


@pytest.mark.parametrize("norm", [False, True])
def test_group_limited_greedy_router_matches_loop(tiny_models, norm):
    cfg = dataclasses.replace(tiny_models["deepseek_v2"].config, n_routed_experts=16, n_group=4, topk_group=2,
                              num_experts_per_tok=3, norm_topk_prob=norm, routed_scaling_factor=1.5)
    x, W, _ = _router_inputs(cfg)
    r = GroupLimitedGreedyRouter(cfg)
    r.weight.data.copy_(W)
    kw = dict(score="softmax", bias=[0.0] * 16, topk_group=2, group_score=lambda v: v[0], k=3,
              norm=norm, eps=1e-20, scaling=1.5)
    want_ids, want_w = _loop_route(x, W, n_group=4, **kw)
    _check_router(r, x, want_ids, want_w)
    assert not torch.equal(_loop_route(x, W, n_group=1, **{**kw, "topk_group": 1})[0], want_ids)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen3_softmax_router_matches_loop(tiny_models, norm):
    cfg = dataclasses.replace(tiny_models["qwen3_moe"].config, num_experts=12, num_experts_per_tok=3,
                              norm_topk_prob=norm)
    x, W, _ = _router_inputs(cfg)
    r = SoftmaxTopkRouter(cfg)
    r.weight.data.copy_(W)
    want_ids, want_w = _loop_route(x, W, score="softmax", bias=[0.0] * 12, n_group=1, topk_group=1,
                                   group_score=lambda v: v[0], k=3, norm=norm, eps=0.0, scaling=1.0)
    _check_router(r, x, want_ids, want_w)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_tiny_routing_is_not_degenerate(tiny_models, arch):
    """Every routed expert of the tiny checkpoints gets tokens, so tests exercise all of them."""
    model = tiny_models[arch]
    moe = next(layer.mlp for layer in model.layers if layer.is_moe)
    x = model.embed_tokens(torch.arange(2, 200))
    ids, w = moe.gate(model.layers[0].post_attention_layernorm(x))
    assert torch.bincount(ids.flatten(), minlength=moe.num_experts).min() > 0
    assert torch.isfinite(w).all() and (w > 0).all()


# (d) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_export_and_compile(tiny_dirs, arch):
    torch._dynamo.reset()  # hermetic: no recompile budget spent by earlier tests
    model = load_model(tiny_dirs[arch], block_size=4, num_layers=2)  # one dense + one MoE layer: faster
    assert [layer.is_moe for layer in model.layers] == [False, True]
    kv = model.new_kv_cache(16)
    kv.make_batch([("a", [5, 6, 7])])  # a cached prefix for request a
    b = kv.make_batch([("a", [8, 9]), ("b", [3, 4, 5, 6, 7])], pad_to=8)
    eager_caches = [c.clone() for c in kv.caches]
    eager = model(*b.args(), eager_caches)

    ep = torch.export.export(model, (*b.args(), [c.clone() for c in kv.caches]))
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    attn_op = "tbo.paged_attention" if arch == "qwen3_moe" else "tbo.latent_attention"
    assert any(attn_op in n for n in names) and any("tbo.moe_experts" in n for n in names)
    exported_caches = [c.clone() for c in kv.caches]
    torch.testing.assert_close(ep.module()(*b.args(), exported_caches), eager, atol=1e-5, rtol=0)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_caches = [c.clone() for c in kv.caches]
    torch.testing.assert_close(compiled(*b.args(), compiled_caches), eager, atol=1e-5, rtol=0)
    for c_eager, c_exp, c_comp in zip(eager_caches, exported_caches, compiled_caches):
        torch.testing.assert_close(c_exp, c_eager, atol=1e-5, rtol=0)  # the cache writes survive
        torch.testing.assert_close(c_comp, c_eager, atol=1e-5, rtol=0)


# (e) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_padding_rows_do_not_change_real_rows(tiny_models, arch):
    model = tiny_models[arch]
    steps = [[("a", _tokens(6, 4)), ("b", _tokens(3, 5))], [("a", [7]), ("b", [9, 10])]]
    plain = sc.serve(model, steps)
    padded = sc.serve(model, steps, pad_to=16)
    for r in plain:
        torch.testing.assert_close(padded[r], plain[r], atol=ATOL, rtol=0)
