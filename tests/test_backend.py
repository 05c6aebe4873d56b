"""torch.compile(model, backend="tbo"): the registered backend splits, schedules and matches eager."""
from __future__ import annotations


import warnings

import pytest
import torch

from tbo_compiler.backend import tbo_backend
from tbo_compiler.models import load_model
from tbo_compiler.models.tiny import make_tiny
from tbo_compiler.ops.errors import TboCompileError
from tbo_compiler.passes.pipeline import TboFallbackWarning



def test_backend_is_registered_by_entry_point():
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    assert "tbo" in list_backends() and lookup_backend("tbo") is tbo_backend


def test_backend_on_deepseek_v3_matches_eager(tmp_path):
    d = make_tiny("deepseek_v3", tmp_path / "m", seed=4, num_hidden_layers=2)
    model = load_model(d, dtype=torch.float32, block_size=4)
    kv_ref, kv = model.new_kv_cache(16), model.new_kv_cache(16)
    reqs = [("a", list(range(3, 9))), ("b", list(range(20, 24)))]
    b_ref, b = kv_ref.make_batch(reqs, max_blocks=4), kv.make_batch(reqs, max_blocks=4)
    torch._dynamo.reset()
    seen = []
    with torch.no_grad():
        ref = model(*b_ref.args(), kv_ref.caches)
        out = torch.compile(model, backend="tbo", dynamic=False, options={
            "token_inputs": ["input_ids", "positions", "slot_mapping", "block_table"], "split": True,
            "on_compile": seen.append})(*b.args(), kv.caches)
    (c,) = seen
    assert c.cut == 5 and c.T == 10
    assert (out - ref).abs().max() <= 2e-5
    assert max((x - y).abs().max() for x, y in zip(kv_ref.caches, kv.caches)) <= 1e-5  # cache writes kept


def test_backend_default_token_inputs_and_dynamic_refused(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x).relu()

    m = Tiny()
    x = torch.randn(6, 4)
    torch._dynamo.reset()
    seen = []
    with torch.no_grad():
        out = torch.compile(m, backend="tbo", dynamic=False, options={"on_compile": seen.append})(x)
    assert torch.allclose(out, m(x), atol=1e-6) and seen[0].cut == 0  # no comm: nothing to overlap
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m, backend="tbo", dynamic=False, options={"on_compile": seen.append, "split": True})(x)
    assert torch.allclose(out, m(x), atol=1e-6) and seen[1].cut == 3



def test_dynamic_shapes_run_as_plain_inductor_with_one_warning():
    """Without dynamic=False, dynamo compiles a second batch size dynamically: backend='tbo' runs
    that graph as plain Inductor (correct, no TBO) with one warning saying dynamic=False is needed,
    never torch's multi-line BackendCompilerFailed."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    torch._dynamo.reset()
    fn = torch.compile(m, backend="tbo")   # dynamic=None: static first, dynamic on a new size
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for T in (6, 7, 9):
            x = torch.randn(T, 4)
            torch.testing.assert_close(fn(x), m(x), rtol=1e-5, atol=1e-5)
    said = [x for x in w if issubclass(x.category, TboFallbackWarning) and "dynamic shapes" in str(x.message)]
    assert len(said) == 1 and "pass dynamic=False" in str(said[0].message)


@pytest.mark.slow
def test_funcol_moe_over_gloo_matches_eager():
    """A model using only torch + functional collectives (none of the project's ops), 2 ranks."""
    import funcol_moe
    from tbo_compiler.runtime.launch import run_ranks

    for diff, scale, cut, kinds in run_ranks(funcol_moe.rank_check, 2, 6):
        assert scale > 0.1 and diff <= 1e-5
        assert cut == 3
        assert kinds == ["all_gather"] * 4 + ["reduce_scatter"] * 4  # 2 layers x 2 ubatches


def test_graph_break_between_comm_halves_is_reported_with_source_line():
    class Breaks(torch.nn.Module):
        def forward(self, x):
            h = torch.ops.tbo.all_reduce_start(x * 2, "g1", 1)
            torch._dynamo.graph_break()
            return torch.ops.tbo.all_reduce_wait(h, x, "g1", 1) + 1

    torch._dynamo.reset()
    with pytest.raises(Exception) as e, torch.no_grad():
        torch.compile(Breaks(), backend="tbo", dynamic=False)(torch.randn(4, 3))
    msg = str(e.value)
    assert "graph break" in msg and "test_backend.py" in msg
    assert isinstance(e.value, TboCompileError) or "TboCompileError" in msg


def test_recompile_limit_by_batch_size_is_warned(tmp_path):
    """Past dynamo's recompile_limit a new batch size runs eagerly without TBO: the backend says so
    when a graph reaches the limit (once), and not before."""
    import warnings

    from tbo_compiler import TboFallbackWarning

    model = load_model(make_tiny("qwen3_moe", tmp_path / "m", num_hidden_layers=1), dtype=torch.float32)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="tbo", dynamic=False, options={"split": True})
    kv = model.new_kv_cache(64)
    warned = []
    for i, n in enumerate((3, 4, 5, 6)):
        with warnings.catch_warnings(record=True) as rec, torch.no_grad(), \
                torch._dynamo.config.patch(recompile_limit=3):
            warnings.simplefilter("always")
            fast(*kv.make_batch([(f"r{i}", list(range(1, n + 1)))]).args(), kv.caches)
        warned.append([str(w.message) for w in rec if issubclass(w.category, TboFallbackWarning)])
    assert [len(w) for w in warned] == [0, 0, 1, 0], warned
    assert "recompile_limit" in warned[2][0] and "pad_to" in warned[2][0]
