"""Compile time of the full-size DeepSeek-V3 config (meta weights) against the number of layers.

    python bench/compile_time.py --layers 8,16,32,61 --out bench/results/compile_time.json

Writes config.json with the real DeepSeek-V3 fields (shared/reference/MODELS.md) into a temp dir
(no weights: tracing needs shapes only), then times `compile_model_dir` (capture + passes + plan
write) per layer count, with the pass timings. Runs on whatever machine it is started on; the
JSON records which.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

DSV3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "vocab_size": 129280, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "max_position_embeddings": 163840, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="8,16,32,61")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ep", type=int, default=8)
    ap.add_argument("--capture", default="make_fx")
    ap.add_argument("--out", default="bench/results/compile_time.json")
    args = ap.parse_args()

    from tbo_compiler.compile import compile_model_dir

    rows = []
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(DSV3, f)
        for L in [int(x) for x in args.layers.split(",")]:
            stages = {}
            t0 = time.perf_counter()
            plan = compile_model_dir(d, os.path.join(d, "plan.pt"), ep=args.ep, moe_comm="a2a", mode="prefill",
                                     token_counts=(args.tokens,), profile="h200", num_layers=L,
                                     capture=args.capture, stats=stages)
            total = time.perf_counter() - t0
            b = plan["buckets"][0]
            rows.append({"layers": L, "seconds": round(total, 2), "graph_nodes": len(b["nodes"]),
                         "comm_ops": b["summary"]["comm_ops"], "plan_bytes": os.path.getsize(os.path.join(d, "plan.pt")),
                         "stages_s": {k: round(v, 2) for k, v in stages.items()}})
            print(json.dumps(rows[-1]), flush=True)
    out = {"bench": "compile_time", "model": "deepseek_v3 full config, meta weights", "ep": args.ep,
           "tokens": args.tokens, "capture": args.capture, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for r in rows:
        print(f"{r['layers']:>3} layers: {r['seconds']:6.1f} s  ({r['seconds'] / r['layers']:.2f} s/layer, "
              f"{r['graph_nodes']} nodes)")


if __name__ == "__main__":
    main()
