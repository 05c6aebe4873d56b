"""tbo.qk_rope_kv (the GQA attention's q/k norms, rope_half and k|v cache entry in one op): the torch
reference against the ops it stands for, the Triton kernel (interpreter on CPU, compiled on the GPU)
against the Triton kernels of the same ops and against torch, the fake, the token-axis split, and
the attention that calls it.

Exactness (runtime/kernels/triton_rope.py): each backend's qk_rope_kv equals that backend's
rms_norm -> rope_half -> stack bit for bit. Between backends the norm's sum of squares (another
summation order) and, under the interpreter, cos/sin (numpy's, not torch's) can differ by an fp32
ulp: bitwise with order-independent sums at position 0, otherwise within the bounds
test_triton_elementwise.py uses for those ops. On the GPU the sum's order is the layout Triton
gives the reduced row: checked here without a GPU by compiling both kernels for sm_90, and at the
models' dims by the GPU-marked test.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import tbo_compiler  # noqa: F401  (registers the tbo ops and binds their implementations)
from tbo_compiler.models.attention import GQAAttention, RopeHalf
from tbo_compiler.passes.pipeline import CompileOptions, compile_graph
from tbo_compiler.runtime import kernels
from tbo_compiler.runtime.kernels import torch_ref
from tbo_compiler.runtime.kernels import triton_elementwise as te
from tbo_compiler.runtime.kernels import triton_rope as tr
from tbo_compiler.runtime.program import Program

from test_triton_elementwise import assert_close, exact_sum_input

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
EPS = 1e-6
bf = torch.bfloat16


@pytest.fixture
def gen(request):
    """A fresh, logged seed per test: new random inputs every run, reproducible from the log."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"{request.node.name}: seed {seed}")
    return torch.Generator().manual_seed(seed)


def inv_freq_for(Dh, theta=1e6, device=DEV):
    return (1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)).to(device)


def qkv(gen, T, H, G, Dh, dtype, layout="fused", exact=False, device=DEV):
    """q [T, H, Dh], k, v [T, G, Dh] as the attention gets them: views of one fused projection
    output ("fused": token stride (H+2G)Dh, k and v at offsets), separate projections ("separate":
    contiguous), or heads spaced wider than Dh ("padded": head stride Dh + 16)."""
    width = Dh + 16 if layout == "padded" else Dh
    shape = (T, (H + 2 * G) * width)
    flat = exact_sum_input(gen, *shape, dtype=dtype) if exact else (torch.randn(*shape, generator=gen) * 2).to(dtype)
    flat = flat.to(device)
    if layout == "separate":
        return tuple(p.contiguous().view(T, -1, Dh) for p in flat.split([H * Dh, G * Dh, G * Dh], 1))
    heads = flat.view(T, H + 2 * G, width)[..., :Dh]
    return heads[:, :H], heads[:, H:H + G], heads[:, H + G:]


def weights(gen, Dh, dtype, device=DEV):
    return tuple((1 + torch.randn(Dh, generator=gen) / 4).to(dtype).to(device) for _ in range(2))


def positions(gen, T, device=DEV):
    return torch.randint(0, 32768, (T,), generator=gen).to(device)


def composed(rms_norm, rope_half, q, k, v, pos, f, qw=None, kw=None, eps=EPS):
    """What the attention ran before: the norms, the two ropes, the stack (one backend's ops)."""
    if qw is not None:
        q, k = rms_norm(q, qw, eps), rms_norm(k, kw, eps)
    return rope_half(q, pos, f), torch.stack([rope_half(k, pos, f), v], 1)


def assert_bitwise(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        assert g.is_contiguous()
        bad = g != w
        assert not bad.any(), f"{int(bad.sum())} of {g.numel()} differ: {g[bad][:4]} vs {w[bad][:4]}"


# 1. The torch reference is the ops ------------------------------------------------------------

@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("Dh", [64, 128])
@pytest.mark.parametrize("dtype", [bf, torch.float32], ids=str)
def test_torch_reference_is_the_ops(gen, dtype, Dh, norm):
    q, k, v = qkv(gen, 7, 6, 2, Dh, dtype, device="cpu")
    pos, f = positions(gen, 7, "cpu"), inv_freq_for(Dh, device="cpu")
    qw, kw = weights(gen, Dh, dtype, "cpu") if norm else (None, None)
    want = composed(torch_ref.rms_norm, torch_ref.rope_half, q, k, v, pos, f, qw, kw)
    assert_bitwise(torch_ref.qk_rope_kv(q, k, v, pos, f, qw, kw, EPS), want)
    # the op on CPU goes to the torch reference: the same bits as the models' former op calls
    ops = torch.ops.tbo
    args = (qw, kw, EPS) if norm else ()
    assert kernels.select("qk_rope_kv", (q, k, v, pos, f, *args))[0] == "torch"
    assert_bitwise(ops.qk_rope_kv(q, k, v, pos, f, *args),
                   composed(ops.rms_norm, ops.rope_half, q, k, v, pos, f, qw, kw))


# 2. The Triton kernel is the Triton ops --------------------------------------------------------

@pytest.mark.parametrize("layout", ["fused", "separate", "padded"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("Dh", [64, 128])
@pytest.mark.parametrize("dtype", [bf, torch.float32, torch.float16], ids=str)
def test_triton_equals_triton_ops(gen, dtype, Dh, norm, layout):
    T, H, G = 5, 6, 2  # GQA: 3 query heads per kv head
    q, k, v = qkv(gen, T, H, G, Dh, dtype, layout)
    if layout != "separate":
        assert not q.is_contiguous() and k.stride(1) == q.stride(1)  # read in place, not copied
    pos, f = positions(gen, T), inv_freq_for(Dh)
    qw, kw = weights(gen, Dh, dtype) if norm else (None, None)
    want = composed(te.rms_norm, te.rope_half, q, k, v, pos, f, qw, kw)
    assert_bitwise(tr.qk_rope_kv(q, k, v, pos, f, qw, kw, EPS), want)


@pytest.mark.parametrize("H,G,Dh", [(64, 8, 64), (33, 3, 128), (2, 1, 40)])
def test_triton_many_head_blocks_and_odd_sizes(gen, H, G, Dh):
    """More q heads than one program takes (GPT-OSS's 64 at Dh 64 is one block; 33 needs two
    blocks with a ragged end at Dh 128), and a head dim that is not a power of two."""
    q, k, v = qkv(gen, 3, H, G, Dh, bf)
    pos, f = positions(gen, 3), inv_freq_for(Dh)
    qw, kw = weights(gen, Dh, bf)
    assert_bitwise(tr.qk_rope_kv(q, k, v, pos, f, qw, kw, EPS),
                   composed(te.rms_norm, te.rope_half, q, k, v, pos, f, qw, kw))
    assert_bitwise(tr.qk_rope_kv(q, k, v, pos, f), composed(te.rms_norm, te.rope_half, q, k, v, pos, f))


# 3. Triton against torch -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [bf, torch.float32], ids=str)
def test_triton_equals_torch_with_exact_sums_at_position_zero(gen, dtype):
    """Inputs k/8 (sums of squares exact in any order) and angle 0: no step left whose bits depend
    on the implementation, so the backends agree exactly."""
    q, k, v = qkv(gen, 4, 8, 2, 128, dtype, exact=True)
    pos, f = torch.zeros(4, dtype=torch.long, device=DEV), inv_freq_for(128)
    qw, kw = weights(gen, 128, dtype)
    assert_bitwise(tr.qk_rope_kv(q, k, v, pos, f, qw, kw, EPS), torch_ref.qk_rope_kv(q, k, v, pos, f, qw, kw, EPS))


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("dtype", [bf, torch.float32], ids=str)
def test_triton_close_to_torch(gen, dtype, norm):
    q, k, v = qkv(gen, 6, 8, 2, 64, dtype)
    pos, f = positions(gen, 6), inv_freq_for(64)
    qw, kw = weights(gen, 64, dtype) if norm else (None, None)
    got, want = tr.qk_rope_kv(q, k, v, pos, f, qw, kw, EPS), torch_ref.qk_rope_kv(q, k, v, pos, f, qw, kw, EPS)
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-5, rtol=1e-5, max_ulps=2, abs16=1e-5)
    assert torch.equal(got[1][:, 1], v)  # the value half is a copy


# 4. Contract: strides, dtypes, shapes, no tokens ---------------------------------------------

def test_last_dim_strided_is_copied_and_agrees(gen):
    q, k, v = qkv(gen, 4, 4, 2, 64, bf, "separate")
    pos, f = positions(gen, 4), inv_freq_for(64)
    qw, kw = weights(gen, 64, bf)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)      # same values, last dim strided
    assert q_t.stride(-1) != 1 and tr.supported(q_t, k, v, pos, f, qw, kw)
    assert_bitwise(tr.qk_rope_kv(q_t, k, v, pos, f, qw, kw, EPS), tr.qk_rope_kv(q, k, v, pos, f, qw, kw, EPS))


def test_supported_and_errors(gen):
    q, k, v = qkv(gen, 3, 4, 2, 64, bf)
    pos, f = positions(gen, 3), inv_freq_for(64)
    qw, kw = weights(gen, 64, bf)
    assert tr.supported(q, k, v, pos, f, qw, kw, EPS) and tr.supported(q, k, v, pos, f)
    assert not tr.supported(q, k.float(), v, pos, f)                    # mixed activations
    assert not tr.supported(q, k, v, pos, f, qw.float(), kw)            # weight promotes the dtype
    assert not tr.supported(q, k, v, pos.float(), f)                    # float positions
    assert not tr.supported(q.double(), k.double(), v.double(), pos, f)
    odd = torch.zeros(3, 4, 63, dtype=bf, device=DEV)
    assert not tr.supported(odd, odd[:, :2], odd[:, :2], pos, f)       # Dh odd
    with pytest.raises(ValueError, match="Dh even"):
        tr.qk_rope_kv(q, k[:, :, :32], v, pos, f)
    with pytest.raises(ValueError, match="positions"):
        tr.qk_rope_kv(q, k, v, pos[:2], f)
    with pytest.raises(ValueError, match="norm weight"):
        tr.qk_rope_kv(q, k, v, pos, f, qw[:32], kw, EPS)
    with pytest.raises(ValueError, match="does not take"):
        tr.qk_rope_kv(q, k, v, pos, f, qw.float(), kw, EPS)


def test_zero_tokens():
    q, kv_in = torch.empty(0, 4, 64, dtype=bf, device=DEV), torch.empty(0, 2, 64, dtype=bf, device=DEV)
    pos, f = torch.empty(0, dtype=torch.long, device=DEV), inv_freq_for(64)
    for impl in (tr.qk_rope_kv, torch_ref.qk_rope_kv):
        q_out, kv = impl(q, kv_in, kv_in, pos, f)
        assert q_out.shape == (0, 4, 64) and kv.shape == (0, 2, 2, 64) and kv.dtype == bf


def test_fake_follows_the_ops_dtypes(gen):
    """The fake's shapes and dtypes are the ops' (torch's promotion), checked against a real run of
    a mix the Triton kernel leaves to the reference: bf16 activations, fp32 norm weights."""
    q, k, v = qkv(gen, 3, 4, 2, 64, bf, device="cpu")
    pos, f = positions(gen, 3, "cpu"), inv_freq_for(64, device="cpu")
    qw, kw = (w.float() for w in weights(gen, 64, bf, "cpu"))
    real = torch.ops.tbo.qk_rope_kv(q, k, v, pos, f, qw, kw, EPS)
    assert_bitwise(real, composed(torch_ref.rms_norm, torch_ref.rope_half, q, k, v, pos, f, qw, kw))
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.tbo.qk_rope_kv(*(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
                                          for t in (q, k, v, pos, f, qw, kw)), EPS)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    assert real[0].dtype == real[1].dtype == torch.float32 and real[1].shape == (3, 2, 2, 64)


# 5. The split pass: both outputs are row-wise in the tokens ------------------------------------

def test_token_axis_split_is_exact(gen):
    T, H, G, Dh = 10, 4, 2, 64
    q, k, v = qkv(gen, T, H, G, Dh, torch.float32, device="cpu")
    pos, f = positions(gen, T, "cpu"), inv_freq_for(Dh, device="cpu")
    qw, kw = weights(gen, Dh, torch.float32, "cpu")

    def step(q_THD, k_TGD, v_TGD, positions_T, inv_freq, q_weight, k_weight):
        q_THD, kv_T2GD = torch.ops.tbo.qk_rope_kv(q_THD, k_TGD, v_TGD, positions_T, inv_freq, q_weight, k_weight, EPS)
        return q_THD * 2, kv_T2GD.flatten(1) + 1   # consumers downstream of each output, per ubatch

    args = (q, k, v, pos, f, qw, kw)
    gm = make_fx(step)(*args)
    phs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    state = compile_graph(gm, tuple(phs[:4]), T, CompileOptions(strict=True))
    assert 0 < state.cut < T
    fused = [n for n in state.gm.graph.nodes if n.target == torch.ops.tbo.qk_rope_kv.default]
    assert len(fused) == 2                          # one per ubatch
    got = Program(state.gm, state.schedule.instrs)(*args)
    assert_bitwise(got, step(*args))


# 6. The attention: fused with a RopeHalf, the same bits as the separate ops -----------------------

@pytest.mark.parametrize("variant", ["qwen3", "gpt_oss"])
@torch.no_grad()
def test_attention_fused_equals_separate_ops(gen, variant):
    """GQAAttention with the models' RopeHalf (one qk_rope_kv) and with a plain callable (the norm,
    rope and stack ops): the same output and the same cache, bit for bit."""
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    D, H, G, Dh, bs, T = 64, 4, 2, 32, 4, 9
    kw = dict(qk_norm_eps=1e-6) if variant == "qwen3" else dict(bias=True, sinks=True, window=4)
    attn = GQAAttention(D, H, G, Dh, bs, **kw)
    for p in attn.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1 if p.dim() == 1 and variant == "qwen3" else 0))
    x, pos = torch.randn(T, D, generator=gen), torch.arange(T) + 3
    slots, table = torch.arange(T) + 3, torch.arange(4).view(1, 4).expand(T, 4)
    rope = RopeHalf(inv_freq_for(Dh, device="cpu"))

    def plain(x_, p_):
        return torch.ops.tbo.rope_half(x_, p_, rope.inv_freq)

    outs = []
    for r in (rope, plain):
        cache = torch.zeros(16, 2, G, Dh)
        outs.append((attn(x, pos, slots, table, cache, r), cache))
    assert_bitwise(outs[0], outs[1])
    assert outs[0][1].abs().sum() > 0
    x_THD = torch.randn(T, H, Dh, generator=gen)
    assert torch.equal(rope(x_THD, pos), plain(x_THD, pos))  # still a rope for any other caller


# 7. The GPU's summation order, checked without a GPU ------------------------------------------

_LAYOUTS = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tbo_compiler.runtime.kernels import triton_elementwise as te, triton_rope as tr

def reduced(fn, types, consts, aligned, warps):
    names = fn.arg_names
    sig = {n: types.get(n, "constexpr") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts,   # 16-aligned, as the launcher specialises
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    ir = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "enable_fp_fusion": False}).asm["ttgir"]
    layouts = dict(re.findall(r"^(#blocked\d*) = #ttg\.blocked<(.*)>$", ir, re.M))
    out = []
    for op in re.findall(r"^\s*}\) : \(tensor<\d+x\d+xf32, (#blocked\d*)>\)", ir, re.M):
        lay = layouts[op]   # the reduced row's dim: elements per thread, lanes, warps
        out.append([int(re.search(k + r" = \[\d+, (\d+)\]", lay).group(1))
                    for k in ("sizePerThread", "threadsPerWarp", "warpsPerCTA")])
    return out

dt, H, G, Dh = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
p = "*" + dt
res = {"rms_norm": []}
for n_rows in (G, 4096 * G):   # the k norm at decode of one token and at a large prefill
    rows = min(max(1, te._TILE // Dh), triton.next_power_of_2(n_rows))
    types = {**{n: p for n in ("x_ptr", "w_ptr", "o_ptr", "r_ptr", "s_ptr")},
             **{n: "i32" for n in ("n_rows", "D", "inner", "s_outer", "s_inner", "r_inner", "r_outer", "r_inner_s")},
             "eps": "fp32", "inv_d": "fp32"}
    res["rms_norm"] += reduced(te._rms_norm_kernel, types,
                               dict(ROWS=rows, BLOCK_D=Dh, HAS_RES=False, INTERP=False),
                               ("x_ptr", "w_ptr", "o_ptr", "r_ptr", "s_ptr", "D", "s_outer"),
                               te._num_warps(rows * Dh))
bh_q, bh_kv, warps = tr._tiles(H, G, Dh)
ptrs = ("q_ptr", "k_ptr", "v_ptr", "pos_ptr", "f_ptr", "qw_ptr", "kw_ptr", "qo_ptr", "kv_ptr")
strides = ("sq_tok", "sq_head", "sk_tok", "sk_head", "sv_tok", "sv_head")
types = {**{n: p for n in ptrs}, "pos_ptr": "*i64", "f_ptr": "*fp32", "H": "i32", "G": "i32",
         **{n: "i32" for n in strides}, "eps": "fp32", "inv_d": "fp32"}
res["qk_rope_kv"] = reduced(tr._qk_rope_kv_kernel, types,
                            dict(DH=Dh, BLOCK_D=Dh, BLOCK_P=Dh // 2, BH_Q=bh_q, BH_KV=bh_kv,
                                 Q_NORM=True, K_NORM=True, INTERP=False), ptrs + strides, warps)
print(json.dumps(res))
"""


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("H,G,Dh", [(32, 4, 128), (16, 4, 64)])   # T * G * Dh >= 256 at T = 1
def test_sm90_norm_sums_in_the_rms_norm_kernels_order(dtype, H, G, Dh):
    """Compiled for an H100/H200 (Triton's sm_90 pipeline runs without a GPU): every row sum of
    squares in qk_rope_kv has the reduced dim laid out as in the rms_norm kernel (elements per
    thread, lanes, warps along the row), i.e. the same additions in the same order, hence the same
    bits. A tile too small for its warps would spread a row wider and fail here."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compile, not interpret
    run = subprocess.run([sys.executable, "-c", _LAYOUTS, dtype, str(H), str(G), str(Dh)],
                         capture_output=True, text=True, env=env, timeout=300)
    if run.returncode and "ptxas" in run.stderr:
        pytest.skip("no ptxas to finish the sm_90 compile")
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.splitlines()[-1])
    assert len(res["rms_norm"]) == 2 and len(res["qk_rope_kv"]) == 2   # the q and the k norm
    spt, lanes, warps = res["rms_norm"][0]
    assert spt * 2 ** (dtype == "fp32") == 8 and warps == 1    # a 16-byte vector, one warp per row
    assert all(lay == res["rms_norm"][0] for lay in res["rms_norm"] + res["qk_rope_kv"]), res


# GPU: the models' dims, bf16 and fp32, and CUDA-graph capture ----------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 256, 4096])
@pytest.mark.parametrize("model,H,G,Dh,norm,dtype", [("qwen3_30b_a3b", 32, 4, 128, True, bf),
                                                     ("qwen3_30b_a3b", 32, 4, 128, True, torch.float32),
                                                     ("gpt_oss", 64, 8, 64, False, bf)])
def test_gpu_model_dims(gen, model, H, G, Dh, norm, dtype, T):
    q, k, v = qkv(gen, T, H, G, Dh, dtype)
    pos, f = positions(gen, T), inv_freq_for(Dh)
    qw, kw = weights(gen, Dh, dtype) if norm else (None, None)
    args = (q, k, v, pos, f) + ((qw, kw, EPS) if norm else ())
    assert kernels.select("qk_rope_kv", args)[0] == "triton"
    got = torch.ops.tbo.qk_rope_kv(*args)
    # the eager ops the attention called before, on this GPU (Triton backend): the same bits
    assert_bitwise(got, composed(torch.ops.tbo.rms_norm, torch.ops.tbo.rope_half, q, k, v, pos, f, qw, kw))
    for g, w in zip(got, torch_ref.qk_rope_kv(*args)):
        if dtype == torch.float32:
            assert_close(g, w, atol=1e-5, rtol=1e-5, max_ulps=2, abs16=1e-5)
        else:  # bf16 at positions up to 4096: a norm output one ulp off (another summation order)
            # turns into many ulps of a small rotated value (x1 cos - x2 sin cancelling), as it does
            # for the separate Triton ops against torch (measured on an H200: up to 30 ulps of such
            # values, run of 2026-12-03); bounded here by a bf16 ulp of the largest value
            torch.testing.assert_close(g.float(), w.float(), rtol=2 ** -7, atol=2 ** -7 * float(w.abs().max()))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tr.qk_rope_kv(*args)
    q.copy_(torch.randn(q.shape, generator=gen).to(DEV, dtype))  # new values, same buffers
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise(captured, tr.qk_rope_kv(*args))
