"""tbo_compiler.models: plain-PyTorch MoE models, their checkpoint loader and tiny test checkpoints.

    model = load_model("/ckpt/DeepSeek-V3", dtype=torch.bfloat16, device="cuda")
    kv = model.new_kv_cache(num_blocks)
    batch = kv.make_batch([(req_id, token_ids), ...])
    logits_TV = model(*batch.args(), kv.caches)
"""
from tbo_compiler.models.batch import Batch, PagedKVCache, example_inputs, is_padding
from tbo_compiler.models.loader import ModelLoadError, build_model, load_model, read_config
from tbo_compiler.models.moe import ParallelConfig

__all__ = ["Batch", "PagedKVCache", "ParallelConfig", "ModelLoadError", "is_padding", "example_inputs",
           "build_model", "load_model", "read_config"]
