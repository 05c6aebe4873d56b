"""The memory a program needs: the static estimate (passes/memory.py), its place in the plan, and
the load-time refusal of buckets that do not fit (runtime/plan_module.py)."""
from __future__ import annotations

import logging
import operator
import weakref

import pytest
import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tbo_compiler import load_plan
from tbo_compiler.compile import compile_model_dir
from tbo_compiler.load import programs_of
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.ops.errors import RuntimeFailure
from tbo_compiler.ops.instr import Instr, Op
from tbo_compiler.passes.memory import estimate_memory
from tbo_compiler.passes.schedule import lower
from tbo_compiler.plan import read_plan, save_plan
from tbo_compiler.runtime import plan_module
from tbo_compiler.runtime import program as program_module
from tbo_compiler.ops.instr import inplace_updates

aten = torch.ops.aten
KW = dict(dtype=torch.float32, block_size=4, max_blocks=8, profile="cpu")


# (a) a hand-made program, counted by hand ---------------------------------------------------------

def _hand_program():
    """x, w inputs [1024] f32 (4 KiB each, not counted); a = x*w; b = a.view(32, 32) (a's storage);
    c = relu(b); d = topk(c, 2) (two [32, 2] tensors: 256 B f32 -> one 512 B block, 512 B i64);
    e = d[0] (d's first storage); f = e + 1 (256 B -> 512 B); output f."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    a = g.create_node("call_function", aten.mul.Tensor, (x, w), name="a")
    b = g.create_node("call_function", aten.view.default, (a, [32, 32]), name="b")
    c = g.create_node("call_function", aten.relu.default, (b,), name="c")
    d = g.create_node("call_function", aten.topk.default, (c, 2), name="d")
    e = g.create_node("call_function", operator.getitem, (d, 0), name="e")
    f = g.create_node("call_function", aten.add.Tensor, (e, 1.0), name="f")
    g.output((f,))
    gm = fx.GraphModule(torch.nn.Module(), g)
    with torch.device("meta"):
        xv = torch.empty(1024)
        vals = {"x": xv, "w": xv, "a": xv, "b": xv.view(32, 32), "c": xv.view(32, 32),
                "d": (torch.empty(32, 2), torch.empty(32, 2, dtype=torch.int64)), "e": torch.empty(32, 2),
                "f": torch.empty(32, 2)}
    for n in gm.graph.nodes:
        if n.op != "output":
            n.meta["val"] = vals[n.name]
            n.meta["tbo_stream"] = "compute"
    return gm


def test_estimate_equals_a_count_by_hand():
    gm = _hand_program()
    instrs = lower(gm, ["a", "b", "c", "d", "e", "f"])
    # by hand, live storages after each run (frees follow each value's last reader):
    #   a: a 4096 | b: view of a, then `del a` keeps it (b holds it) 4096 | c: a + c = 8192 (peak),
    #   then `del b` frees a's storage: 4096 | d: c + 512 + 512 = 5120, `del c`: 1024 |
    #   e: a view of d[0]; `del d` frees d[1] only: 512 | f: 1024; `del e`: 512 (the output)
    est = estimate_memory(gm, instrs)
    assert (est.peak_bytes, est.peak_node, est.output_bytes) == (8192, "c", 512)
    assert dict(est.live_at_peak) == {"a": 4096, "c": 4096}
    # the same value freed with an event (read on the other stream): under CUDA-graph capture the
    # allocator defers its reuse to the end of the capture, so a's storage stays: d then holds
    # a + c + 1024 = 9216; eager it is freed at the `del` as before
    pinned = tuple(Instr(Op.FREE, i.node, i.ubatch, i.stream, 1) if i.op == Op.FREE and i.node == "b" else i
                   for i in instrs)
    assert estimate_memory(gm, pinned, graphs=True).peak_bytes == 9216
    assert estimate_memory(gm, pinned, graphs=False).peak_bytes == 8192
    # no rounding: d's float half is 256 B
    assert estimate_memory(gm, instrs, granularity=1).output_bytes == 256


# (b) a compiled MoE model: TBO holds half the activations -- but not half the logits -------------

@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Tiny Qwen3-MoE plans at buckets 16 and 64: vocab 32 (the activations inside the layers are
    the peak) and vocab 256 (the logits are)."""
    root = tmp_path_factory.mktemp("mem")
    out = {}
    for vocab in (32, 256):
        d = make_tiny("qwen3_moe", root / f"q{vocab}", seed=2, num_hidden_layers=2, vocab_size=vocab)
        plan = compile_model_dir(d, root / f"p{vocab}.pt", token_counts=(16, 64), **KW)
        out[vocab] = (d, root / f"p{vocab}.pt", plan)
    return out


def _needs(plan) -> dict:
    return {b["tokens"]: {v: p["peak_activation_bytes"] for v, p in b["programs"].items()}
            for b in plan["buckets"]}


def test_tbo_needs_about_half_inside_the_layers_and_one_output_buffer(plans):
    small, large = _needs(plans[32][2]), _needs(plans[256][2])
    # vocab 32: the peak is inside the first layer (the q/k/v projections and tbo.qk_rope_kv), and the
    # interleaved schedule holds one ubatch's layer activations (plus the other's residual stream) at a time
    assert all(type(n) is int and n > 0 for b in small.values() for n in b.values())
    assert small[64]["tbo"] <= 0.6 * small[64]["serial"]
    assert small[64]["serial"] == 4 * small[16]["serial"]      # activations grow with the tokens
    # vocab 256: the logits (64 KiB at 64 tokens) are the largest single activation. The TBO program
    # writes each ubatch's logits into one output buffer (passes/split_ubatches.py), allocated
    # once ubatch 0's part is made; with no comm (one stage) ubatch 1's layers run after that, so
    # the peak is the buffer + ubatch 1's first layer at its tbo.qk_rope_kv, where q, k, v and the
    # results q', k|v are live together (16 + 8 + 8 + 16 + 16 KiB, and the 8 KiB residual stream):
    # 65,536 + 73,728 = 139,264 B. The serial program peaks at the same op over all 64 tokens,
    # 147,456 B. (With the norms, ropes and stack as separate ops a layer held at most 57,344 B, so
    # the logits were the serial peak, 114,688 B, and TBO's 122,880 B was above it; a `cat` joining
    # the halves held 131,072 B. tests/test_split_output.py has a case the logits still bound.)
    est = {v: estimate_memory(p.gm, p.instrs) for v, p in programs_of(plans[256][2])[64].items()}
    tbo = est["tbo"]
    buf = next(n for n, b in tbo.live_at_peak if n.startswith("new_empty"))
    assert dict(tbo.live_at_peak)[buf] == tbo.output_bytes == 65_536
    assert tbo.peak_bytes == 65_536 + 73_728 and tbo.peak_node.startswith("qk_rope_kv")
    assert large[64]["tbo"] == tbo.peak_bytes and large[64]["serial"] == 147_456


def test_two_streams_values_read_across_streams_are_held_to_the_end_of_a_capture(tmp_path):
    """EP=2: the TBO program's comm runs on the comm stream, and a value read on the other stream
    is freed after `record_stream`. Captured in a CUDA graph (the runtime's default on CUDA) the
    caching allocator defers such a block's reuse to the end of the capture, so the plan's figure
    (graphs=True) holds them to the end and is above the eager one; the serial program has one
    stream and no such frees."""
    d = make_tiny("qwen3_moe", tmp_path / "q", seed=2, num_hidden_layers=2, vocab_size=32)
    plan = compile_model_dir(d, tmp_path / "ep2.pt", ep=2, token_counts=(64,), **KW)
    progs = programs_of(plan)[64]
    tbo, serial = progs["tbo"], progs["serial"]
    assert any(i.op == Op.FREE and i.event is not None for i in tbo.instrs)
    assert not any(i.op == Op.FREE and i.event is not None for i in serial.instrs)
    captured, eager = (estimate_memory(tbo.gm, tbo.instrs, graphs=g).peak_bytes for g in (True, False))
    assert tbo.need_bytes == captured > eager
    assert serial.need_bytes == estimate_memory(serial.gm, serial.instrs, graphs=False).peak_bytes


def test_plans_write_their_caches_in_place(plans):
    """The one rule (ops/instr.py inplace_updates) that the runtime executes and the estimate counts
    finds the KV-cache writes of every program."""
    for progs in programs_of(plans[256][2]).values():
        for p in progs.values():
            assert inplace_updates(p.gm, p.instrs) != set()  # the cache writes the estimate frees in place


# (c) the estimate against what the program allocates on CPU -----------------------------------

class LiveStorage(TorchDispatchMode):
    """Sums the bytes of the storages the ops' outputs hold while any tensor over them lives
    (weakref finalizers); storages of the inputs are not counted. `kernel_temps=False`: what a
    kernel allocates inside its call is not counted either, only what it returns (the values the
    program holds, which is what the estimate is about)."""

    def __init__(self, inputs, kernel_temps: bool = True):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}
        self.refs: dict[int, list] = {}
        self.cur = self.peak = 0
        self.kernel_temps, self.depth = kernel_temps, 0

    def _dead(self, key):
        ref = self.refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.cur -= ref[1]
            del self.refs[key]

    def track(self, out):
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.skip or t.untyped_storage().nbytes() == 0:
                continue
            if key not in self.refs:
                self.refs[key] = [0, t.untyped_storage().nbytes()]
                self.cur += self.refs[key][1]
            self.refs[key][0] += 1
            weakref.finalize(t, self._dead, key)
        self.peak = max(self.peak, self.cur)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.kernel_temps or self.depth == 0:
            self.track(out)
        return out


def _measure(prog, args, kernel_temps: bool, monkeypatch) -> int:
    live = LiveStorage(args, kernel_temps)
    call = program_module._Kernel.__call__

    def kernel_call(self, *a):   # a kernel op of the program: its temporaries, then its outputs
        live.depth += 1
        try:
            out = call(self, *a)
        finally:
            live.depth -= 1
        if not kernel_temps:
            live.track(out)
        return out

    monkeypatch.setattr(program_module._Kernel, "__call__", kernel_call)
    with torch.no_grad(), live:
        out = prog(*args)
    del out
    monkeypatch.undo()
    return live.peak


@pytest.mark.parametrize("variant", ["serial", "tbo"])
def test_estimate_matches_what_the_program_allocates_on_cpu(plans, variant, monkeypatch):
    d, path, _ = plans[256]
    run = load_plan(path, d, dtype=torch.float32)
    kv = run.new_kv_cache(32)
    b = kv.make_batch([("a", list(range(1, 9))), ("b", list(range(9, 17)))], max_blocks=8)  # 16 tokens
    bp, _, prog, _ = run.buckets[16][variant]
    args = run.args_for(16, variant, list(b.args()) + list(kv.caches))
    est = estimate_memory(bp.gm, bp.instrs, graphs=False, granularity=1)   # CPU: no blocks, no capture
    # the values the program holds: the walk models them (equal today; 5 % allowed)
    held = _measure(prog, args, False, monkeypatch)
    assert held > 0 and abs(est.peak_bytes - held) <= 0.05 * held, (est, held)
    # with what the kernels allocate inside their calls (here the CPU reference kernels: attention
    # gathers the context, experts run densely) the peak is higher: the estimate is a lower bound
    # of the whole, and the load keeps a margin (runtime/plan_module.py MEMORY_MARGIN_*) for them
    assert _measure(prog, args, True, monkeypatch) >= held
    assert bp.need_bytes >= est.peak_bytes   # the stored figure rounds blocks to 512 bytes


# (d) refusal at load ------------------------------------------------------------------------------

def _free_for(budget: int) -> int:
    """The free bytes that leave `budget` after the margin (the margin's floor applies here)."""
    free = budget + plan_module.MEMORY_MARGIN_MIN
    assert plan_module.memory_budget(free) == budget
    return free


def test_a_bucket_whose_serial_program_does_not_fit_keeps_tbo(plans, caplog):
    d, path, plan = plans[32]
    need = _needs(plan)[64]
    free = _free_for((need["tbo"] + need["serial"]) // 2)
    with caplog.at_level(logging.WARNING, logger="tbo_compiler.runtime.plan_module"):
        run = load_plan(path, d, dtype=torch.float32, free_bytes=free)
    assert set(run.buckets[64]) == {"tbo"} and set(run.buckets[16]) == {"tbo", "serial"}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "serial program needs" in lines[0] and "tbo only" in lines[0]
    report = {(r["tokens"], r["variant"]): r for r in run.memory_report()}
    assert report[64, "serial"]["fits"] is False and report[64, "tbo"]["fits"] is True
    assert report[64, "serial"]["need_bytes"] == need["serial"] and report[64, "tbo"]["kept"]
    assert run.largest_fitting_bucket("prefill") == 64 and run.largest_fitting_bucket("decode") is None
    # "auto" has one program left: it neither measures nor runs serial
    kv = run.new_kv_cache(64)
    b = kv.make_batch([("a", list(range(1, 21))), ("b", list(range(1, 21)))], max_blocks=8)   # 40 tokens
    assert run(*b.args(), kv.caches).shape[0] == 40
    assert run.decisions[64] == {"variant": "tbo", "by": "only one"}
    with pytest.raises(RuntimeFailure, match="serial program needs .* dropped at load"):
        run(*b.args(), kv.caches, variant="serial")


def test_a_bucket_that_does_not_fit_is_refused_in_one_line(plans, caplog):
    d, path, plan = plans[32]
    need = _needs(plan)
    free = _free_for(max(need[16].values()) + 1024)   # bucket 16 fits, bucket 64 (either program) not
    assert free < plan_module.MEMORY_MARGIN_MIN + need[64]["tbo"]
    with caplog.at_level(logging.WARNING, logger="tbo_compiler.runtime.plan_module"):
        run = load_plan(path, d, dtype=torch.float32, free_bytes=free)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    line = lines[0]
    assert line.startswith("bucket 64 (prefill) needs") and "tbo " in line and "serial " in line
    assert "cpu has 512.0 MiB free" in line and line.endswith("refused; largest bucket that fits: 16")
    assert set(run.buckets) == {16} and run.largest_fitting_bucket() == 16
    kv = run.new_kv_cache(64)
    b = kv.make_batch([("a", list(range(1, 21))), ("b", list(range(1, 21)))], max_blocks=8)   # 40 tokens
    with pytest.raises(RuntimeFailure) as e:
        run(*b.args(), kv.caches)
    assert "\n" not in str(e.value) and "bucket 64 (prefill) needs" in str(e.value)
    small = kv.make_batch([("c", list(range(1, 11)))], max_blocks=8)   # 10 tokens: bucket 16 runs
    assert run(*small.args(), kv.caches).shape[0] == 10


def test_cpu_checks_nothing_and_old_plans_load(plans, tmp_path):
    d, path, plan = plans[32]
    run = load_plan(path, d, dtype=torch.float32)
    assert {r["fits"] for r in run.memory_report()} == {None} and not run.refused
    # a plan written before the field: the need is computed at load, the same number
    old = read_plan(path)
    for b in old["buckets"]:
        for p in b["programs"].values():
            del p["peak_activation_bytes"]
    save_plan(old, tmp_path / "old.pt")
    run = load_plan(tmp_path / "old.pt", d, dtype=torch.float32)
    got = {(r["tokens"], r["variant"]): r["need_bytes"] for r in run.memory_report()}
    assert got == {(t, v): n for t, b in _needs(plan).items() for v, n in b.items()}
