"""The decoder shell every architecture shares; an architecture's file holds only what differs.

Legend: T tokens, D hidden, V vocab.

    embed_tokens -> for each layer:  h += self_attn(input_layernorm(h))
                                     h += mlp(post_attention_layernorm(h))     (MoE block or dense MLP)
                 -> norm -> lm_head -> fp32 logits (tbo.linear_f32: the GEMM writes fp32, no cast pass)

Each residual add is made inside the norm that follows it (tbo.add_rms_norm: one kernel for the
add and the norm, the same bits as the two): a layer takes and returns the stream as two terms,
(the last block's output, the sum before it), and the next norm adds them.

The shell runs over the engine-style flat batch and the paged KV cache (batch.py). An architecture subclasses
`DecoderModel` and supplies:

    checkpoint_names            parameter name -> on-disk name templates (loader.py reads them)
    make_attention(i)           layer i's attention: forward(x, positions, slot_mapping,
                                block_table, cache, rope) -> [T, D]
    make_mlp(i, par)            (module, is_moe): an MoEBlock (forward(x, pad_T)) or a dense MLP (forward(x))
    rope_table()                (inv_freq, cos/sin multiplier), computed again after `to_empty`
    rope(x, positions)          rotate x [T, heads, R] with the table (interleaved or half-split pairs)
    cache_entry_shape(i)        one cache slot of layer i
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tbo_compiler.models.batch import PagedKVCache, is_padding
from tbo_compiler.models.moe import ParallelConfig, RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, is_moe: bool, dim: int, eps: float, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps, dtype)
        self.post_attention_layernorm = RMSNorm(dim, eps, dtype)
        self.self_attn = self_attn
        self.mlp, self.is_moe = mlp, is_moe

    def forward(self, out_TD, res_TD, positions_T, slot_mapping_T, block_table_TB, cache, rope, pad_T):
        """The residual stream is out_TD + res_TD (res_TD None before the first layer); returns
        the stream after this layer the same way: (the MLP's output, the sum before it)."""
        if res_TD is None:
            x_TD, res_TD = self.input_layernorm(out_TD), out_TD
        else:
            x_TD, res_TD = self.input_layernorm.add(out_TD, res_TD)
        a_TD = self.self_attn(x_TD, positions_T, slot_mapping_T, block_table_TB, cache, rope)
        x_TD, res_TD = self.post_attention_layernorm.add(a_TD, res_TD)
        return (self.mlp(x_TD, pad_T) if self.is_moe else self.mlp(x_TD)), res_TD


class DecoderModel(nn.Module):
    """The shell; see the module docstring for what a subclass supplies."""
    checkpoint_names: dict = {}
    token_inputs = ("input_ids", "positions", "slot_mapping", "block_table")
    #: the logits in fp32 straight out of the lm_head's GEMM (tbo.linear_f32); False: a GEMM in the
    #: model's dtype and a cast, the way models from elsewhere end (tests of the cast's handling)
    fp32_logits_gemm = True

    def __init__(self, cfg, par: ParallelConfig | None = None, block_size: int = 16, dtype=torch.float32):
        super().__init__()
        self.config, self.block_size, self.dtype = cfg, block_size, dtype
        self.parallel = par = par or ParallelConfig()
        D = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(self.make_attention(i), *self.make_mlp(i, par), D,
                                                 cfg.rms_norm_eps, dtype)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False, dtype=dtype)
        self.init_buffers()

    # -- what an architecture supplies
    def make_attention(self, i: int) -> nn.Module:
        raise NotImplementedError

    def make_mlp(self, i: int, par: ParallelConfig) -> tuple[nn.Module, bool]:
        raise NotImplementedError

    def rope_table(self) -> tuple[Tensor, float]:
        raise NotImplementedError

    def rope(self, x: Tensor, positions_T: Tensor) -> Tensor:
        raise NotImplementedError

    def cache_entry_shape(self, i: int) -> tuple[int, ...]:
        raise NotImplementedError

    # -- the shell
    def init_buffers(self) -> None:
        """(Re)compute the rope table and re-tie embeddings: the loader builds the model on the
        meta device and calls this after `to_empty`, which leaves buffers and ties behind."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq, self.rope_mul = self.rope_table()
        self.register_buffer("inv_freq", inv_freq.to(self.embed_tokens.weight.device), persistent=False)

    def kv_cache_entry_shapes(self) -> list[tuple[int, ...]]:
        return [self.cache_entry_shape(i) for i in range(self.config.num_hidden_layers)]

    def new_kv_cache(self, num_blocks: int, *, dtype=None, device=None) -> PagedKVCache:
        return PagedKVCache(self.kv_cache_entry_shapes(), num_blocks, self.block_size,
                            dtype=dtype or self.dtype, device=device or self.embed_tokens.weight.device)

    def forward(self, input_ids: Tensor, positions: Tensor, slot_mapping: Tensor, block_table: Tensor,
                kv_caches: list[Tensor]) -> Tensor:
        pad_T = is_padding(slot_mapping, self.block_size)
        out_TD, res_TD = self.embed_tokens(input_ids), None
        for layer, cache in zip(self.layers, kv_caches):
            out_TD, res_TD = layer(out_TD, res_TD, positions, slot_mapping, block_table, cache, self.rope, pad_T)
        x_TD = self.norm(out_TD) if res_TD is None else self.norm.add(out_TD, res_TD)[0]
        if self.fp32_logits_gemm and type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            # fp32 straight out of the GEMM: the cast pass over the [T, V] logits after a 16-bit
            # GEMM took 2.6 ms of GPT-OSS's prefill 4096 on an H200 and 1.9 ms of Qwen3's
            # (bench/results/roofline_h200, third and fourth runs)
            return torch.ops.tbo.linear_f32(x_TD, self.lm_head.weight)
        return self.lm_head(x_TD).float()
