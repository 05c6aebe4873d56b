"""GPT-OSS and Mixtral end to end: on-disk format, one layer against a reference written here from
the format and model descriptions (MODELS.md), serving steps against one full forward, TBO
against no TBO at EP=1 and EP=2 (gloo), and `tbo-compile` on the tiny checkpoints and on the
full-size configs (meta weights).

The references read the weights straight from the safetensors files (MXFP4 decoded here from the
format description, not with the project's quant.py), so they check the loader too.
Tolerances: fp32; one layer 1e-4 (activations O(1-10)); TBO vs eager 1e-5 (the split only
changes which rows each op sees: float reassociation).
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from tbo_compiler import load_plan
from tbo_compiler.cli import main as cli_main
from tbo_compiler.models import ModelLoadError, ParallelConfig, build_model, load_model, read_config
from tbo_compiler.models import quant
from tbo_compiler.models.gpt_oss import GptOssModel
from tbo_compiler.models.mixtral import MixtralModel
from tbo_compiler.models.tiny import make_tiny

import tbo_scenarios as sc

ARCHS = ["gpt_oss", "mixtral"]
ATOL = 1e-4
TBO_ATOL = 1e-5


def _disk(d) -> dict:
    """Every on-disk tensor of a checkpoint directory, as stored."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


# MXFP4, decoded from the format description ------------------------------------------------------

def _fp4(nibble: int) -> float:
    """E2M1: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal (m * 0.5)."""
    sign = -1.0 if nibble & 8 else 1.0
    e, m = (nibble >> 1) & 3, nibble & 1
    return sign * (m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2))


def mxfp4_reference(blocks, scales):
    """[..., G, 16] uint8 and [..., G] uint8 -> float64 [..., G*32]: byte k of a block holds
    elements 2k (low nibble) and 2k+1 (high nibble); the block's scale is 2^(s - 127)."""
    lut = torch.tensor([_fp4(n) for n in range(16)], dtype=torch.float64)
    b = blocks.long()
    vals = torch.stack([lut[b % 16], lut[b // 16]], -1).flatten(-2)                   # [..., G, 32]
    return (vals * torch.pow(2.0, scales.double() - 127).unsqueeze(-1)).flatten(-2)


def test_mxfp4_decoding_and_round_trip():
    blocks = torch.zeros(2, 16, dtype=torch.uint8)  # two blocks of 32 values
    blocks[0, 0], blocks[0, 1], blocks[1, 15] = 0x2F, 0x97, 0x31  # (low, high): (-6, 1), (6, -0.5), (0.5, 1.5)
    scales = torch.tensor([128, 125], dtype=torch.uint8)  # x2, x1/4
    want = torch.zeros(64, dtype=torch.float64)
    want[:4] = torch.tensor([-6.0, 1.0, 6.0, -0.5]) * 2.0
    want[62:] = torch.tensor([0.5, 1.5]) / 4
    assert torch.equal(mxfp4_reference(blocks, scales), want)
    assert torch.equal(quant.dequantize_mxfp4(blocks, scales).double(), want)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 7, 96, generator=g) * torch.logspace(-3, 2, 96)  # blocks of very different ranges
    b, s = quant.quantize_mxfp4(w)
    assert b.dtype == s.dtype == torch.uint8 and b.shape == (3, 7, 3, 16) and s.shape == (3, 7, 3)
    dq = mxfp4_reference(b, s)
    torch.testing.assert_close(quant.dequantize_mxfp4(b, s).double(), dq, rtol=0, atol=0)
    # each value is within half a step of FP4's grid at its block's scale (the largest step is 2)
    step = torch.pow(2.0, s.double() - 127).repeat_interleave(32, -1)
    assert ((dq - w.double()).abs() <= step + 1e-12).all()
    assert (dq - w.double()).abs().max() > 0  # really quantized


# Loading ----------------------------------------------------------------------------------------

def _experts_from_disk(disk, layer, lo=0, n=None):
    """GPT-OSS layer's experts lo..lo+n from the on-disk tensors: (gate, up, gate_b, up_b, down, down_b)."""
    p = f"model.layers.{layer}.mlp.experts."
    gu = mxfp4_reference(disk[p + "gate_up_proj_blocks"], disk[p + "gate_up_proj_scales"])
    down = mxfp4_reference(disk[p + "down_proj_blocks"], disk[p + "down_proj_scales"])
    gub, db = disk[p + "gate_up_proj_bias"].double(), disk[p + "down_proj_bias"].double()
    sl = slice(lo, None if n is None else lo + n)
    return gu[sl, 0::2], gu[sl, 1::2], gub[sl, 0::2], gub[sl, 1::2], down[sl], db[sl]


def test_gpt_oss_on_disk_format_and_loaded_weights(tiny_dirs, tiny_models):
    d, model = tiny_dirs["gpt_oss"], tiny_models["gpt_oss"]
    assert isinstance(model, GptOssModel) and (d / "model.safetensors.index.json").exists()
    disk = _disk(d)
    c = json.loads((d / "config.json").read_text())
    E, I, D = c["num_local_experts"], c["intermediate_size"], c["hidden_size"]
    assert disk["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (E, 2 * I, D // 32, 16)
    assert disk["model.layers.0.mlp.experts.gate_up_proj_scales"].shape == (E, 2 * I, D // 32)
    assert disk["model.layers.1.mlp.experts.down_proj_blocks"].shape == (E, D, I // 32, 16)
    assert disk["model.layers.1.mlp.experts.down_proj_blocks"].dtype == torch.uint8
    assert disk["model.layers.1.mlp.experts.down_proj_scales"].dtype == torch.uint8
    assert disk["model.layers.0.self_attn.sinks"].shape == (c["num_attention_heads"],)
    for layer in (0, 1):
        ex = model.layers[layer].mlp.experts
        gate, up, gb, ub, down, db = _experts_from_disk(disk, layer)
        for got, want in ((ex.w13[:, :I], gate), (ex.w13[:, I:], up), (ex.w13_bias[:, :I], gb),
                          (ex.w13_bias[:, I:], ub), (ex.w2, down), (ex.w2_bias, db)):
            torch.testing.assert_close(got.double(), want, rtol=0, atol=0)
        attn, gate_mod = model.layers[layer].self_attn, model.layers[layer].mlp.gate
        p = f"model.layers.{layer}."
        k_rows = attn.qkv_proj.weight[attn.H * attn.Dh:(attn.H + attn.G) * attn.Dh]  # qkv_proj rows: [q; k; v]
        for got, name in ((attn.sinks, "self_attn.sinks"), (attn.o_proj.bias, "self_attn.o_proj.bias"),
                          (k_rows, "self_attn.k_proj.weight"), (gate_mod.weight, "mlp.router.weight"),
                          (gate_mod.bias, "mlp.router.bias")):
            torch.testing.assert_close(got.double(), disk[p + name].double(), rtol=0, atol=0)
    assert [a.window for a in (layer.self_attn for layer in model.layers)] == [4, 0]
    # EP=2, rank 1: experts 4..7 of the all-experts tensors
    part = load_model(d, parallel=ParallelConfig(ep_size=2, ep_rank=1), block_size=4)
    ex = part.layers[1].mlp.experts
    gate, up, gb, ub, down, db = _experts_from_disk(disk, 1, lo=4, n=4)
    assert ex.w13.shape == (4, 2 * I, D)
    torch.testing.assert_close(ex.w13.double(), torch.cat([gate, up], 1), rtol=0, atol=0)
    torch.testing.assert_close(ex.w2_bias.double(), db, rtol=0, atol=0)


def test_mixtral_on_disk_format(tiny_dirs, tiny_models):
    d, model = tiny_dirs["mixtral"], tiny_models["mixtral"]
    assert isinstance(model, MixtralModel)
    disk = _disk(d)
    assert disk["model.layers.1.block_sparse_moe.experts.3.w3.weight"].dtype == torch.bfloat16
    assert not any("mlp." in n for n in disk)
    assert read_config(d).head_dim == 16  # hidden / heads: the config has no head_dim


def test_gpt_oss_load_errors_are_one_line(tiny_dirs, tmp_path):
    from safetensors.torch import save_file

    d = make_tiny("gpt_oss", tmp_path / "g", seed=0, num_hidden_layers=1)
    name = "model.layers.0.mlp.experts.down_proj_scales"
    file = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(d / file), "pt") as h:
        tensors = {n: h.get_tensor(n) for n in h.keys()}
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(d / file))
    with pytest.raises(ModelLoadError) as ei:
        load_model(d)
    msg = str(ei.value)
    assert "\n" not in msg and name in msg and file in msg and "expected" in msg
    with pytest.raises(ModelLoadError, match="8 experts do not divide over ep_size 3"):
        build_model(d, parallel=ParallelConfig(ep_size=3))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "layer_types": ["local_attention"]}))
    with pytest.raises(ModelLoadError, match="layer_types"):
        load_model(d)


# One layer against a reference written here ------------------------------------------------------

def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _yarn_gpt_oss(c):
    """GPT-OSS's rotary table: NTK-by-parts between the (untruncated) correction dims, cos/sin
    scaled by the concentration 0.1 ln(factor) + 1."""
    sc_, Dh = c["rope_scaling"], c["head_dim"]
    half = Dh / 2
    freq = c["rope_theta"] ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    low = half * math.log(sc_["original_max_position_embeddings"] / (sc_["beta_fast"] * 2 * math.pi)) / math.log(c["rope_theta"])
    high = half * math.log(sc_["original_max_position_embeddings"] / (sc_["beta_slow"] * 2 * math.pi)) / math.log(c["rope_theta"])
    ramp = (torch.arange(int(half), dtype=torch.float64) - low) / (high - low)
    extrapolate = 1 - ramp.clamp(0, 1)
    inv_freq = 1 / (sc_["factor"] * freq) * (1 - extrapolate) + 1 / freq * extrapolate
    return inv_freq, 0.1 * math.log(sc_["factor"]) + 1


def _rope_half(x, inv_freq, mul):
    """rotate_half RoPE of x [T, heads, Dh] at positions 0..T-1, cos/sin times `mul`."""
    ang = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * inv_freq
    cos, sin = (torch.cos(ang) * mul)[:, None], (torch.sin(ang) * mul)[:, None]
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _attention(x, disk, p, c, inv_freq, mul, *, bias, sinks=None, window=0):
    """Causal GQA of one request at positions 0..T-1, written out per head."""
    T, H, G, Dh = x.shape[0], c["num_attention_heads"], c["num_key_value_heads"], c.get("head_dim")
    Dh = Dh or c["hidden_size"] // H

    def lin(name, inp):
        w = disk[f"{p}.self_attn.{name}.weight"].double()
        return inp @ w.T + (disk[f"{p}.self_attn.{name}.bias"].double() if bias else 0)

    q = _rope_half(lin("q_proj", x).view(T, H, Dh), inv_freq, mul)
    k = _rope_half(lin("k_proj", x).view(T, G, Dh), inv_freq, mul).repeat_interleave(H // G, 1)
    v = lin("v_proj", x).view(T, G, Dh).repeat_interleave(H // G, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(Dh)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one more logit per head, dropped after the softmax
        s = torch.cat([s, sinks.double().view(H, 1, 1).expand(H, T, 1)], -1)
    prob = s.softmax(-1)[..., :T]
    o = torch.einsum("hij,jhd->ihd", prob, v).reshape(T, H * Dh)
    return lin("o_proj", o)


def _gpt_oss_moe(x, disk, p, c, layer):
    logits = x @ disk[f"{p}.mlp.router.weight"].double().T + disk[f"{p}.mlp.router.bias"].double()
    top, ids = logits.topk(c["num_experts_per_tok"], -1)
    weights = top.softmax(-1)
    gate_w, up_w, gate_b, up_b, down_w, down_b = _experts_from_disk(disk, layer)
    L = c["swiglu_limit"]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t]):
            g = (gate_w[e] @ x[t] + gate_b[e]).clamp(max=L)
            u = (up_w[e] @ x[t] + up_b[e]).clamp(-L, L)
            out[t] += w * (down_w[e] @ ((u + 1) * g * torch.sigmoid(1.702 * g)) + down_b[e])
    return out, ids


def _mixtral_moe(x, disk, p, c, layer):
    probs = (x @ disk[f"{p}.block_sparse_moe.gate.weight"].double().T).softmax(-1)
    top, ids = probs.topk(c["num_experts_per_tok"], -1)
    weights = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t].tolist(), weights[t]):
            ex = f"{p}.block_sparse_moe.experts.{e}."
            h = F.silu(disk[ex + "w1.weight"].double() @ x[t]) * (disk[ex + "w3.weight"].double() @ x[t])
            out[t] += w * (disk[ex + "w2.weight"].double() @ h)
    return out, ids


def _reference_layer(arch, d, layer, h, **attn_kw):
    c, disk = json.loads((d / "config.json").read_text()), _disk(d)
    p, eps = f"model.layers.{layer}", c["rms_norm_eps"]
    if arch == "gpt_oss":
        inv_freq, mul = _yarn_gpt_oss(c)
        kw = dict(bias=True, sinks=disk[f"{p}.self_attn.sinks"],
                  window=c["sliding_window"] if c["layer_types"][layer] == "sliding_attention" else 0)
    else:
        Dh = c["hidden_size"] // c["num_attention_heads"]
        inv_freq, mul = 1 / c["rope_theta"] ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh), 1.0
        kw = dict(bias=False)
    kw.update(attn_kw)
    h = h + _attention(_rms(h, disk[f"{p}.input_layernorm.weight"].double(), eps), disk, p, c, inv_freq, mul, **kw)
    x = _rms(h, disk[f"{p}.post_attention_layernorm.weight"].double(), eps)
    moe, ids = (_gpt_oss_moe if arch == "gpt_oss" else _mixtral_moe)(x, disk, p, c, layer)
    return h + moe, ids


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_one_layer_matches_reference(tiny_dirs, tiny_models, arch, layer):
    d, model = tiny_dirs[arch], tiny_models[arch]
    T = 11  # longer than GPT-OSS's tiny window (4) and than a cache block (4)
    h = torch.randn(T, model.config.hidden_size, generator=torch.Generator().manual_seed(layer)) * 2
    kv = model.new_kv_cache(16)
    b = kv.make_batch([("r", list(range(T)))])
    out, res = model.layers[layer](h, None, b.positions, b.slot_mapping, b.block_table, kv.caches[layer],
                                   model.rope, torch.zeros(T, dtype=torch.bool))
    got = out + res  # the layer returns the residual stream as (MLP output, the sum before it)
    want, ids = _reference_layer(arch, d, layer, h.double())
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=1e-4)
    assert len(ids.unique()) >= 4  # the tokens spread over the experts
    if arch == "gpt_oss":  # sinks and (on layer 0) the window change the result: the test sees them
        no_sinks, _ = _reference_layer(arch, d, layer, h.double(), sinks=None)
        assert (no_sinks - want).abs().max() > 1e-2
        if layer == 0:
            no_window, _ = _reference_layer(arch, d, layer, h.double(), window=0)
            assert (no_window - want).abs().max() > 1e-2


# Serving steps ----------------------------------------------------------------------------------

def _tokens(n, seed):
    return torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_steps_match_full_forward(tiny_models, arch):
    """B's prefix a step early, a mixed prefill, three decode steps, one multi-token step, with
    padding rows; against one forward of each whole sequence (contexts > GPT-OSS's window)."""
    model = tiny_models[arch]
    seq = {"A": _tokens(12, 1), "B": _tokens(16, 2), "C": _tokens(8, 3)}
    steps = [[("B", seq["B"][:4])], [("A", seq["A"][:7]), ("B", seq["B"][4:10]), ("C", seq["C"][:3])]]
    done = {"A": 7, "B": 10, "C": 3}
    for _ in range(3):
        steps.append([(r, seq[r][done[r]:done[r] + 1]) for r in ("C", "A", "B")])
        done = {r: n + 1 for r, n in done.items()}
    steps.append([(r, seq[r][done[r]:]) for r in ("A", "B", "C")])
    served = sc.serve(model, steps, pad_to=24)
    for req, toks in seq.items():
        full = sc.serve(model, [[(req, toks)]])[req]
        assert served[req].shape == full.shape == (len(toks), model.config.vocab_size)
        torch.testing.assert_close(served[req], full, atol=ATOL, rtol=0)
    assert (full[1:] - full[:-1]).abs().max() > 0.1


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_tiny_routing_is_not_degenerate(tiny_models, arch):
    model = tiny_models[arch]
    moe = model.layers[0].mlp
    ids, w = moe.gate(model.layers[0].post_attention_layernorm(model.embed_tokens(torch.arange(2, 200))))
    assert torch.bincount(ids.flatten(), minlength=moe.num_experts).min() > 0
    assert torch.isfinite(w).all() and (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(len(w)))


@torch.no_grad()
def test_gpt_oss_traces_fullgraph(tiny_models):
    """torch.compile(fullgraph=True) takes the optional kernel arguments (sinks, window, expert
    biases, activation) and equals eager, KV-cache writes included."""
    torch._dynamo.reset()
    model = tiny_models["gpt_oss"]
    kv = model.new_kv_cache(16)
    kv.make_batch([("a", [5, 6, 7, 8, 9])])  # a cached prefix longer than the window
    b = kv.make_batch([("a", [8, 9]), ("b", [3, 4, 5, 6, 7])], pad_to=8)
    eager_caches, compiled_caches = [c.clone() for c in kv.caches], [c.clone() for c in kv.caches]
    eager = model(*b.args(), eager_caches)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*b.args(), compiled_caches), eager, atol=1e-5, rtol=0)
    for a, c in zip(eager_caches, compiled_caches):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=0)


# TBO == no TBO ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tbo_equals_eager_single_rank(tiny_dirs, tiny_models, arch, tmp_path):
    d, model = tiny_dirs[arch], tiny_models[arch]
    plans = {k: load_plan(p, d, dtype=torch.float32, policy="tbo") for k, p in sc.compile_plans(d, tmp_path).items()}
    assert {k: sc.cuts(v) for k, v in plans.items()} == {"prefill": [(4, 2), (14, 7)], "decode": [(1, 0), (3, 2)],
                                                         "mtp": [(6, 4)]}
    logit_diff, cache_diff, scale = sc.compare(model, plans, seed=3, vocab=model.config.vocab_size)
    assert scale > 0.5
    assert max(logit_diff) <= TBO_ATOL, logit_diff
    assert cache_diff <= TBO_ATOL
    assert {v["variant"] for p in plans.values() for v in p.decisions.values()} == {"tbo", "serial"}


@pytest.mark.slow
def test_tbo_equals_eager_ep2_gloo(tiny_dirs, tiny_models, tmp_path):
    """EP=2 over gloo, GPT-OSS with dispatch/combine (a2a), Mixtral with DP attention (allgather):
    on each rank the plans (TBO forced) equal the eager EP model, and that model equals EP=1."""
    from tbo_compiler.runtime.launch import run_ranks

    jobs = [("gpt_oss", "a2a"), ("mixtral", "allgather")]
    specs = [(str(tiny_dirs[a]), {k: str(p) for k, p in sc.compile_plans(tiny_dirs[a], tmp_path, 2, m).items()}, m)
             for a, m in jobs]
    seed = 5
    results = run_ranks(sc.rank_compare_many, 2, specs, seed)
    for rank, per_job in enumerate(results):
        for (arch, mode), (logit_diff, cache_diff, scale, cuts, eager) in zip(jobs, per_job):
            assert scale > 0.5
            assert max(logit_diff) <= TBO_ATOL, (arch, mode, rank, logit_diff)
            assert cache_diff <= TBO_ATOL, (arch, mode, rank, cache_diff)
            assert cuts["prefill"] == [(4, 2), (14, 7)] and cuts["decode"] == [(1, 0), (3, 2)]
            ep1 = sc.eager_logits(tiny_models[arch], seed + 101 * rank, tiny_models[arch].config.vocab_size)
            for a, b in zip(eager, ep1):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# tbo-compile ----------------------------------------------------------------------------------------

def _layer_lines(summary: str, layers: int) -> list[str]:
    """The summary's comm-ops-per-layer lines ("  layer N: ..."; stage lines read "layer N stage")."""
    lines = [ln.strip() for ln in summary.splitlines() if re.match(r"  layer \d+: ", ln)]
    for i in range(layers):  # every layer has its dispatch and its combine
        assert any(ln.startswith(f"layer {i}: dispatch x1") and "combine x1" in ln for ln in lines), (i, lines)
    return lines


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_on_tiny_checkpoint(tiny_dirs, arch, tmp_path, capsys):
    out, dumps = tmp_path / "plan.pt", tmp_path / "dumps"
    rc = cli_main([str(tiny_dirs[arch]), "-o", str(out), "--ep", "2", "--tokens", "8", "--dtype", "float32",
                   "--profile", "cpu", "--dump-dir", str(dumps), "--block-size", "4", "--max-blocks", "8"])
    assert rc == 0 and out.exists()
    # counted as found in the model (2 layers x (dispatch, combine)), each run once per ubatch
    assert "T=8: TBO cut 4/4, 4 comm ops found (each run once per ubatch)" in capsys.readouterr().out
    assert len(_layer_lines((dumps / "T8" / "summary.txt").read_text(), 2)) == 2


GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
    "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 12, "attention_bias": True,
    "rms_norm_eps": 1e-5, "rope_theta": 150000, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "quantization_config": {"quant_method": "mxfp4"},
}
GPT_OSS_120B = {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 18}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
    "sliding_window": None, "tie_word_embeddings": False,
}


@pytest.mark.parametrize("name,config,ep,layers", [("gpt-oss-20b", GPT_OSS_20B, 2, None),
                                                   ("gpt-oss-120b", GPT_OSS_120B, 8, 6),
                                                   ("mixtral-8x7b", MIXTRAL_8X7B, 2, 6)])
def test_cli_on_full_size_config(tmp_path, name, config, ep, layers, capsys):
    """The real configs, no weights (tracing needs shapes only): every layer's dispatch/combine
    is found and listed. 120b and Mixtral: their first 6 layers (the layers repeat), for time."""
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    out, dumps = tmp_path / "plan.pt", tmp_path / "dumps"
    argv = [str(d), "-o", str(out), "--ep", str(ep), "--tokens", "256", "--dump-dir", str(dumps)]
    assert cli_main(argv + (["--layers", str(layers)] if layers else [])) == 0
    L = layers or config["num_hidden_layers"]
    assert f"T=256: TBO cut 128/128, {2 * L} comm ops found" in capsys.readouterr().out
    summary = (dumps / "T256" / "summary.txt").read_text()
    assert len(_layer_lines(summary, L)) == L and f"ep (world {ep})" in summary
    plan = torch.load(out, weights_only=True)
    assert json.loads(plan["json"])["parallel"]["num_layers"] == L


# GPU ----------------------------------------------------------------------------------------------

def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_model_on_gpu_matches_fp32_cpu(tiny_dirs, arch):
    """bf16 on the GPU (Triton GQA with sinks/window, Triton MoE with biases and the clamped
    activation) against fp32 on the CPU: greedy tokens agree on >= 90 % of the 31 tokens."""
    d = tiny_dirs[arch]
    ref = load_model(d, dtype=torch.float32, block_size=sc.BLOCK_SIZE)
    gpu = load_model(d, dtype=torch.bfloat16, device="cuda", block_size=sc.BLOCK_SIZE)
    kv_r, kv_g = ref.new_kv_cache(sc.NUM_BLOCKS), gpu.new_kv_cache(sc.NUM_BLOCKS, device="cuda")
    agree, rel = [], []
    for _, reqs in sc.steps(0, ref.config.vocab_size):
        br = kv_r.make_batch(reqs, max_blocks=sc.MAX_BLOCKS)
        bg = kv_g.make_batch(reqs, max_blocks=sc.MAX_BLOCKS, device="cuda")
        with torch.no_grad():
            a, b = ref(*br.args(), kv_r.caches), gpu(*bg.args(), kv_g.caches)
        assert b.is_cuda and torch.isfinite(b).all()
        rel.append(_rel(b.cpu(), a))
        agree.append(b.cpu().argmax(-1) == a.argmax(-1))
    assert torch.cat(agree).float().mean() >= 0.9, rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpt_oss_plan_on_gpu_matches_eager(tiny_dirs, tmp_path):
    """GPT-OSS's TBO plan as a CUDA graph of the two-stream program equals eager (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    d = tiny_dirs["gpt_oss"]
    paths = sc.compile_plans(d, tmp_path)
    model = load_model(d, dtype=torch.float32, device="cuda", block_size=sc.BLOCK_SIZE)
    plans = {k: load_plan(p, d, device="cuda", dtype=torch.float32, policy="tbo", graphs=True) for k, p in paths.items()}
    logit_diff, cache_diff, scale = sc.compare(model, plans, 4, model.config.vocab_size, device="cuda")
    assert max(logit_diff) <= 1e-5 * max(scale, 1.0) and cache_diff <= 1e-5
