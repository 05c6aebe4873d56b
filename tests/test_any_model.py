"""`torch.compile(model, backend="tbo")` on models this project did not write (tests/any_models.py):
each compiles, equals eager (fp32, 1e-5), and reports whether it split and how many comm ops it
found; those with comm split into two ubatches with the comm of one beside compute of the other."""
from __future__ import annotations

import pytest
import torch

import any_models
from tbo_compiler.runtime.launch import run_ranks
from tbo_compiler.summary import verdict

ATOL = 1e-5


# HuggingFace transformers (one process: no comm, so the split is asked for) ------------------

def _prefill_then_decode_equal_eager(m, fn):
    """A prefill of 4 requests x 8 tokens, then one decode token each on the KV cache (DynamicCache)
    the prefill filled: the compiled model's logits equal eager's at both."""
    from transformers import DynamicCache

    ids, nxt = torch.randint(0, 128, (4, 8)), torch.randint(0, 128, (4, 1))
    with torch.no_grad():
        r1 = m(ids, past_key_values=DynamicCache(config=m.config), use_cache=True)
        r2 = m(nxt, past_key_values=r1.past_key_values, use_cache=True).logits
        o1 = fn(ids, past_key_values=DynamicCache(config=m.config), use_cache=True)
        o2 = fn(nxt, past_key_values=o1.past_key_values, use_cache=True).logits
    assert (o1.logits - r1.logits).abs().max() <= ATOL and (o2 - r2).abs().max() <= ATOL


@pytest.mark.parametrize("name", any_models.HF_MODELS)
def test_transformers_model_splits_at_prefill_and_decode(name):
    """With the batched experts implementation every op keeps the requests apart: the [B, S]
    batch splits by request (B), the KV cache (DynamicCache) included, and equals eager."""
    pytest.importorskip("transformers")

    m = any_models.hf_model(name, experts_implementation="batched_mm")
    fn, seen, warned = any_models.compile_tbo(m, split=True)
    _prefill_then_decode_equal_eager(m, fn)
    rep = any_models.report(seen)
    assert [(r["T"], r["cut"], r["comm"], r["fallback"]) for r in rep] == [(4, 2, 0, None), (4, 2, 0, None)], rep
    assert not warned
    assert verdict(seen[0]).startswith("Verdict: TBO on: split into 2 ubatches (2 + 2 tokens), 0 comm ops found")


@pytest.mark.parametrize("name", any_models.HF_DEFAULT_MODELS)
def test_transformers_model_with_default_implementations_splits(name):
    """Default experts (grouped_mm: sort the (token, k) pairs by expert, count them, grouped GEMM,
    unsort) and default attention: the sort -> grouped GEMM -> unsort region splits as a whole,
    each ubatch sorting its own requests' tokens, at prefill and decode (KV cache), equal to eager."""
    pytest.importorskip("transformers")

    m = any_models.hf_model(name)
    assert m.config._experts_implementation == "grouped_mm"  # nothing set: the library's default
    fn, seen, warned = any_models.compile_tbo(m, split=True, strict=True, inductor=False)
    _prefill_then_decode_equal_eager(m, fn)
    assert [(c.T, c.cut, c.did_split) for c in seen] == [(4, 2, True), (4, 2, True)], any_models.report(seen)
    sorts = [n for n in seen[0].gm.graph.nodes if n.target == torch.ops.aten.sort.default]
    per = [n.meta["tbo_ubatch"] for n in sorts]  # one sort per MoE layer and ubatch
    assert per and per.count(0) == per.count(1) == len(per) // 2
    assert not warned


def test_transformers_model_that_mixes_tokens_falls_back_with_one_warning():
    """Experts that sort the batch's tokens and never put them back (an experts function of the
    user's, registered with transformers) mix tokens: the graph runs unsplit, outputs unchanged,
    with one warning naming the sort and the user's line; strict raises it in one line."""
    pytest.importorskip("transformers")
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    def sorted_rows_experts(self, hidden_states, top_k_index, top_k_weights):
        order = torch.sort(top_k_index[:, 0]).indices        # never inverted: rows stay sorted
        return hidden_states[order] * top_k_weights.sum(-1, keepdim=True)

    ALL_EXPERTS_FUNCTIONS.register("tbo_test_sorted_rows", sorted_rows_experts)
    m = any_models.hf_model("qwen3_moe", experts_implementation="tbo_test_sorted_rows")
    ids = torch.randint(0, 128, (4, 8))
    fn, seen, warned = any_models.compile_tbo(m, split=True, inductor=False)
    with torch.no_grad():
        ref, out = m(ids, use_cache=False).logits, fn(ids, use_cache=False).logits
    assert (out - ref).abs().max() <= ATOL
    (rep,) = any_models.report(seen)
    assert rep["cut"] == 0 and "order of sort" in rep["fallback"]
    assert len(warned) == 1 and "without TBO" in warned[0] and "test_any_model.py:" in warned[0]
    assert verdict(seen[0]).startswith("Verdict: no TBO, the graph runs unsplit (0 comm ops found): ")
    strict, _, _ = any_models.compile_tbo(m, split=True, strict=True, inductor=False)
    with pytest.raises(Exception, match="TokenAxisError") as e, torch.no_grad():
        strict(ids, use_cache=False)
    assert "sort" in str(e.value)


def test_transformers_model_without_split_asked_compiles_unsplit():
    """One process has no comm: the default ("auto") compiles without a split and says why."""
    pytest.importorskip("transformers")
    m = any_models.hf_model("mixtral", experts_implementation="batched_mm")
    ids = torch.randint(0, 128, (2, 8))
    fn, seen, warned = any_models.compile_tbo(m)
    with torch.no_grad():
        assert (fn(ids, use_cache=False).logits - m(ids, use_cache=False).logits).abs().max() <= ATOL
    assert any_models.report(seen)[0]["cut"] == 0 and not warned
    assert verdict(seen[0]) == "Verdict: no TBO: no communication found, nothing to overlap (split=True forces a split)"


# expert / tensor parallel models over 2 gloo ranks --------------------------------------------

EP_CASES = [  # model, tokens per rank, comm kinds per compiled graph
    ("a2a", 8, ["all_to_all"] * 4), ("a2a", 2, ["all_to_all"] * 4),
    ("funcol", 8, ["all_gather"] * 2 + ["reduce_scatter"] * 2), ("funcol", 2, ["all_gather"] * 2 + ["reduce_scatter"] * 2),
    ("misc", 8, ["all_reduce"] * 2), ("misc", 2, ["all_reduce"] * 2),
]


@pytest.mark.slow
def test_parallel_models_split_and_match_eager_over_gloo():
    """Prefill (8 tokens per rank) and decode (2) sizes, all in one pair of processes."""
    res = run_ranks(_all_cases, 2)
    for rank_res in res:
        for (name, T, kinds), r in zip(EP_CASES, rank_res):
            assert r["diff"] <= ATOL * max(1.0, r["scale"]), (name, T, r)
            (rep,) = r["report"]
            assert rep["cut"] == T // 2 and rep["fallback"] is None, (name, T, rep)
            assert [k.replace("all_to_all_single", "all_to_all") for k in r["kinds"]] == sorted(kinds), (name, r["kinds"])
            assert r["split_comm"] == [2 * len(kinds)]  # each comm op once per ubatch
            assert r["beside"][0] >= len(kinds), (name, T, r["beside"])  # one ubatch's comm, the other's compute
            assert not r["warned"]


def _all_cases(rank, world):
    return [any_models.rank_check(rank, world, name, T) for name, T, _ in EP_CASES]


@pytest.mark.slow
def test_grad_mode_inference_and_backward_match_eager():
    """Without torch.no_grad(): the forward (with its saved activations) is split, the backward
    runs unsplit; outputs and gradients equal eager."""
    for r in run_ranks(any_models.rank_check, 2, "funcol", 6, True):
        assert r["diff"] <= ATOL and r["grad_diff"] <= 1e-4, r
        assert r["report"][0]["cut"] == 3


@pytest.mark.slow
def test_ranks_agree_on_the_split():
    """All ranks compile the same program: a rank whose graph cannot split makes every rank run
    unsplit (not strict), or every rank raise the same one-line error naming it (strict);
    ranks with different token counts run unsplit; never a hang."""
    loose = run_ranks(any_models.rank_dependent_check, 2, 6, False, timeout=300)
    for r in loose:
        assert r["diff"] <= ATOL and r["report"][0]["cut"] == 0 and r["report"][0]["fallback"], r
    assert "sort" in loose[1]["report"][0]["fallback"] and "disagree" in loose[0]["report"][0]["fallback"]
    strict = run_ranks(any_models.rank_dependent_check, 2, 6, True, timeout=300)
    assert strict[0]["error"] == strict[1]["error"] and "rank 1" in strict[0]["error"], strict
    uneven = run_ranks(any_models.uneven_check, 2, [6, 4], timeout=300)
    for r in uneven:
        assert r["diff"] <= ATOL and r["report"][0]["cut"] == 0, r
        assert "split sizes" in r["report"][0]["fallback"] or "disagree" in r["report"][0]["fallback"]


def test_readme_any_model_snippet():
    """The README's worked third-party example runs as written."""
    pytest.importorskip("transformers")
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"<!-- snippet: tests/test_any_model.py::test_readme_any_model_snippet -->\n```python\n(.*?)```",
                      text, re.S).group(1)
    torch._dynamo.reset()
    exec(compile(block, "README.md", "exec"), {})
