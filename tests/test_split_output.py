"""The split program writes each ubatch's rows of a token-axis output straight into one output
buffer (passes/split_ubatches.py): no `cat` of the two halves at the end, values unchanged, and
the output costs its size plus one half at most -- below the serial program when the output is a
cast (bf16 model, fp32 logits), whose fp32 halves are then never made."""
from __future__ import annotations

import pytest
import torch

import tbo_scenarios as S
from tbo_compiler import load_plan
from tbo_compiler.compile import compile_model_dir
from tbo_compiler.load import programs_of
from tbo_compiler.models import load_model
from tbo_compiler.models.decoder import DecoderModel
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.ops.instr import Op
from tbo_compiler.passes.memory import estimate_memory
from tbo_compiler.plan import read_plan

aten = torch.ops.aten


def _output_writes(gm):
    """{output buffer: [(ubatch, rows [lo, hi), source node)]} of a split program's graph."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    writes = {}
    for buf in out.all_input_nodes:
        assert buf.target == aten.new_empty.default, buf.format_node()
        writes[buf.name] = sorted(
            (r.meta["tbo_ubatch"], tuple(r.args[2:4]), next(iter(r.users)).args[1])
            for r in buf.users if r.target == aten.slice.Tensor)
    return writes


def _cats_at_the_end(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [n.name for n in gm.graph.nodes if n.target == aten.cat.default and out in n.users]


# (a) fp32 plans: the halves are written into the output, values as eager --------------------

@pytest.fixture(scope="module")
def fp32_plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    d = make_tiny("qwen3_moe", root / "m", seed=3, num_hidden_layers=2)
    return d, S.compile_plans(d, root)


def test_split_programs_write_the_halves_into_one_output(fp32_plans):
    d, paths = fp32_plans
    seen = 0
    for kind, path in paths.items():
        for T, progs in programs_of(read_plan(path)).items():
            if "tbo" not in progs:
                continue
            p = progs["tbo"]
            assert not _cats_at_the_end(p.gm)
            (writes,) = _output_writes(p.gm).values()   # the logits: one buffer, one write per ubatch
            assert [(u, rows) for u, rows, _ in writes] == [(0, (0, p.cut)), (1, (p.cut, T))], (kind, T)
            # the write runs right after its part is made: in the schedule, on the compute stream,
            # before anything of the other ubatch that comes later
            runs = [i for i in p.instrs if i.op == Op.RUN]
            order = {i.node: k for k, i in enumerate(runs)}
            for u, _, src in writes:
                w = next(x for x in p.gm.graph.nodes if x.target == aten.copy_.default and x.args[1] is src)
                assert order[w.name] > order[src.name] and runs[order[w.name]].stream == "compute"
            seen += 1
    assert seen == 4   # prefill 4 and 14, decode 3, mtp 6 (decode 1 is not split)


def test_split_output_equals_eager_prefill_and_decode(fp32_plans):
    d, paths = fp32_plans
    model = load_model(d, dtype=torch.float32, block_size=S.BLOCK_SIZE)
    plans = {k: load_plan(p, d, dtype=torch.float32, policy="tbo") for k, p in paths.items()}
    logit_diff, cache_diff, scale = S.compare(model, plans, seed=5, vocab=model.config.vocab_size)
    assert max(logit_diff) <= 1e-5 * scale and cache_diff <= 1e-5
    # the plan's own serial program on the same batch: the same logits
    run = load_plan(paths["prefill"], d, dtype=torch.float32)
    kv_a, kv_b = model.new_kv_cache(S.NUM_BLOCKS), model.new_kv_cache(S.NUM_BLOCKS)
    reqs = [("a", list(range(3, 10))), ("b", list(range(20, 27)))]   # 14 tokens, cut 7
    out = run(*kv_a.make_batch(reqs, max_blocks=S.MAX_BLOCKS).args(), kv_a.caches, variant="tbo")
    ref = run(*kv_b.make_batch(reqs, max_blocks=S.MAX_BLOCKS).args(), kv_b.caches, variant="serial")
    assert out.shape == ref.shape == (14, model.config.vocab_size)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# (b) the memory: logits-dominated bucket (vocab 4096, T=64) --------------------------------------

KW = dict(token_counts=(64,), block_size=4, max_blocks=8, profile="cpu")


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """Plans whose logits are a cast: the lm_head's GEMM in the model's dtype, then `.float()`, the
    way models from elsewhere end (ours make fp32 logits in the GEMM: test_fp32_logits_gemm_...)."""
    root = tmp_path_factory.mktemp("vocab")
    d = make_tiny("qwen3_moe", root / "m", seed=2, num_hidden_layers=2, vocab_size=4096)
    DecoderModel.fp32_logits_gemm = False
    try:
        return d, {dt: compile_model_dir(d, root / f"{dt}.pt", dtype=getattr(torch, dt), **KW)
                   for dt in ("bfloat16", "float32")}
    finally:
        DecoderModel.fp32_logits_gemm = True


def test_fp32_logits_gemm_holds_no_16_bit_logits(tmp_path):
    """The models' own ending (tbo.linear_f32): a bf16 model's serial program holds the fp32 logits
    (1 MiB) and the final norm (8 KiB), not also the bf16 logits of a cast (512 KiB)."""
    d = make_tiny("qwen3_moe", tmp_path / "m", seed=2, num_hidden_layers=2, vocab_size=4096)
    plan = compile_model_dir(d, tmp_path / "p.pt", dtype=torch.bfloat16, **KW)
    p = programs_of(plan)[64]["serial"]
    assert (estimate_memory(p.gm, p.instrs).peak_bytes) == (1 << 20) + 8192
    assert [n for n in p.gm.graph.nodes if n.target == torch.ops.tbo.linear_f32.default][-1].meta["tbo_val"] \
        == [[64, 4096], "float32"]


def test_tbo_needs_less_than_serial_when_the_logits_are_a_cast(big_vocab):
    d, plans = big_vocab
    est = {v: estimate_memory(p.gm, p.instrs) for v, p in programs_of(plans["bfloat16"])[64].items()}
    tbo, serial = est["tbo"], est["serial"]
    # bf16 model, fp32 logits [64, 4096] = 1 MiB. Serial: at the cast, bf16 (512 KiB) and fp32
    # (1 MiB) logits: 1,572,864 B. TBO: the output buffer (1 MiB) + ubatch 1's bf16 logits
    # (256 KiB) + its final norm (4 KiB) = 1,314,816 B. Before the output writes it was the `cat`:
    # both fp32 halves and the whole, 2,097,152 B.
    assert (serial.peak_bytes, serial.output_bytes) == (1_572_864, 1 << 20)
    assert (tbo.peak_bytes, tbo.output_bytes) == (1_314_816, 1 << 20)
    assert tbo.peak_bytes < serial.peak_bytes
    gm = programs_of(plans["bfloat16"])[64]["tbo"].gm
    ((buf, writes),) = _output_writes(gm).items()
    assert dict(tbo.live_at_peak)[buf] == 1 << 20
    # the cast is folded into the writes: the copies read bf16 halves, no fp32 half exists
    assert [src.meta["tbo_val"] for _, _, src in writes] == [[[32, 4096], "bfloat16"]] * 2
    assert not [n for n in gm.graph.nodes if n.target == aten._to_copy.default
                and n.meta["tbo_val"] == [[32, 4096], "float32"]]


def test_fp32_logits_cost_the_whole_plus_one_half(big_vocab):
    d, plans = big_vocab
    est = {v: estimate_memory(p.gm, p.instrs) for v, p in programs_of(plans["float32"])[64].items()}
    # fp32 model: the lm_head's matmul makes each fp32 half itself, so TBO holds the buffer (1 MiB)
    # + one half (512 KiB) + the final norm (8 KiB) = 1,581,056 B (the `cat` held 2,097,152 B);
    # serial holds the logits + its final norm, 1,064,960 B
    assert est["tbo"].peak_bytes == 1_581_056 and est["serial"].peak_bytes == 1_064_960


def test_bf16_tbo_equals_serial_on_the_same_plan(big_vocab):
    d, plans = big_vocab
    run = load_plan(d.parent / "bfloat16.pt", d, dtype=torch.bfloat16)
    model = load_model(d, dtype=torch.bfloat16, block_size=4)
    kv_a, kv_b = model.new_kv_cache(64), model.new_kv_cache(64)
    reqs = [(f"r{i}", list(range(1 + 8 * i, 9 + 8 * i))) for i in range(8)]   # 64 tokens, cut 32
    out = run(*kv_a.make_batch(reqs, max_blocks=8).args(), kv_a.caches, variant="tbo")
    ref = run(*kv_b.make_batch(reqs, max_blocks=8).args(), kv_b.caches, variant="serial")
    assert out.dtype == ref.dtype == torch.float32 and out.shape == (64, 4096)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


# (c) backend="tbo": the same writes on a graph from torch.compile ---------------------------------

class _CastOut(torch.nn.Module):
    """bf16 compute, fp32 output (as a model's logits), and a second token-axis output."""

    def __init__(self, d=16, v=64):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(d, d, dtype=torch.bfloat16) / d ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(d, v, dtype=torch.bfloat16) / d ** 0.5)

    def forward(self, x):
        h = torch.nn.functional.silu(x @ self.w1)
        return (h @ self.w2).float(), h


def test_backend_writes_halves_and_folds_the_cast():
    torch.manual_seed(0)
    m = _CastOut()
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    torch._dynamo.reset()
    seen = []
    with torch.no_grad():
        logits, h = torch.compile(m, backend="tbo", dynamic=False,
                                  options={"split": True, "on_compile": seen.append})(x)
        ref_logits, ref_h = m(x)
    (st,) = seen
    assert st.cut == 5 and not _cats_at_the_end(st.gm)
    writes = _output_writes(st.gm)
    assert len(writes) == 2 and all([(u, r) for u, r, _ in w] == [(0, (0, 5)), (1, (5, 10))] for w in writes.values())
    assert st.split.folded and {src.meta["val"].dtype for w in writes.values() for _, _, src in w} == {torch.bfloat16}
    assert logits.dtype == torch.float32 and torch.equal(logits, ref_logits) and torch.equal(h, ref_h)
