"""transformers' own expert parallelism under `backend="tbo"`, for test_hf_ep.py: run by every
spawned rank (importable by module name; spawn hands the parent's sys.path, which holds tests/,
to the children) and, unsharded, by the parent for the reference.

A tiny Qwen3-MoE checkpoint (any_models.hf_model, written with save_pretrained) is loaded with
`from_pretrained(dir, distributed_config=DistributedConfig(ep_size=2, ...))`, in each style:

  all_reduce       tp_size=2:   both ranks hold the batch; each runs its 2 of 4 experts on every
                                token (the other routes masked), an all-reduce sums the outputs.
                                Attention, embedding and lm_head are tensor parallel (DTensor).
  all_to_all       tp_size=2:   each rank of the TP pair sends its half of the rows' routes to the
                                experts' ranks (all-to-all, split sizes read back with .tolist()).
  all_to_all_fsdp  fsdp_size=2: each rank holds its own batch (one row of the reference's two);
                                dense weights FSDP-sharded, routes exchanged as above.
"""
from __future__ import annotations

import traceback

import torch

import any_models

STYLES = {
    "all_reduce": {"tp_size": 2, "ep_implementation": "all_reduce"},
    "all_to_all": {"tp_size": 2, "ep_implementation": "all_to_all"},
    "all_to_all_fsdp": {"fsdp_size": 2, "ep_implementation": "all_to_all"},
}


def write_checkpoint(path) -> torch.nn.Module:
    """The tiny model (4 experts, top-2, 2 layers, fp32), saved to `path`; returns it (unsharded)."""
    model = any_models.hf_model("qwen3_moe")
    model.save_pretrained(path)
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def rows(style: str, rank: int, ids: torch.Tensor) -> torch.Tensor:
    """What this rank's batch is: the whole batch (TP shares it) or its own row (FSDP)."""
    return ids[rank:rank + 1] if "fsdp_size" in STYLES[style] else ids


def run_style(rank: int, path: str, style: str, ids: torch.Tensor) -> dict:
    """One style on this rank: eager EP and backend="tbo" (split asked for) on the same rows."""
    import transformers as tf
    from transformers.distributed import DistributedConfig

    try:
        cfg = DistributedConfig(ep_size=2, **STYLES[style])
        model = tf.AutoModelForCausalLM.from_pretrained(path, distributed_config=cfg, dtype=torch.float32).eval()
        x = rows(style, rank, ids)
        fn, seen, warned = any_models.compile_tbo(model, split=True)
        with torch.no_grad():
            eager = model(input_ids=x, use_cache=False).logits
            out = fn(input_ids=x, use_cache=False).logits
            again = fn(input_ids=x, use_cache=False).logits  # a second call reuses the compiled graphs
    except Exception:  # noqa: BLE001 - reported per style, so one style's failure names itself
        return {"error": traceback.format_exc()}
    return {"eager": eager, "tbo": out, "again": again, "warned": warned,
            "report": [dict(r, did_split=c.did_split) for r, c in zip(any_models.report(seen), seen)]}


def rank_main(rank: int, world: int, path: str, styles, ids: torch.Tensor) -> dict:
    return {style: run_style(rank, path, style, ids) for style in styles}
