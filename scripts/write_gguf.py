"""Write a GGUF file of random bf16 weights in a preset's shape, for llama.cpp to run beside
`fsmoe bench infer` (the same shapes and the same kind of weights; not the same numbers).

Supports the llama-architecture MoE presets llama.cpp names ``qwen3moe`` (qk_norm) and ``llama``
with experts (Mixtral). The tensors are written one at a time (drawn on the GPU when there is one),
so the host never holds the model. No tokenizer: the file says ``no_vocab`` with the model's
vocabulary size, which is all llama-bench needs.

Usage: python scripts/write_gguf.py OUT.gguf --config qwen3-30b-a3b [--set model.n_layers=24]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from fsmoe.config import load_config


def tensors(cfg):
    """(name, numpy-order shape, is_matrix) of every tensor llama.cpp's loader expects."""
    D, V, E, F = cfg.d_model, cfg.vocab_size, cfg.moe.num_experts, cfg.moe.experts.d_ff
    H, KV, hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
    yield "token_embd.weight", (V, D), True
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (D,), False
        yield b + "attn_q.weight", (H * hd, D), True
        yield b + "attn_k.weight", (KV * hd, D), True
        yield b + "attn_v.weight", (KV * hd, D), True
        yield b + "attn_output.weight", (D, H * hd), True
        if cfg.qk_norm:
            yield b + "attn_q_norm.weight", (hd,), False
            yield b + "attn_k_norm.weight", (hd,), False
        yield b + "ffn_norm.weight", (D,), False
        yield b + "ffn_gate_inp.weight", (E, D), False
        yield b + "ffn_gate_exps.weight", (E, F, D), True
        yield b + "ffn_up_exps.weight", (E, F, D), True
        yield b + "ffn_down_exps.weight", (E, D, F), True
    yield "output_norm.weight", (D,), False
    if not cfg.tie_embeddings:
        yield "output.weight", (V, D), True


def main() -> None:
    import gguf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--config", default="qwen3-30b-a3b")
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides).model
    if cfg.arch != "llama" or cfg.attention == "mla" or cfg.moe.experts.num_shared or cfg.first_dense:
        raise SystemExit(f"{args.config}: only llama-style MoE models without MLA, shared experts or dense layers")
    arch = "qwen3moe" if cfg.qk_norm else "llama"
    w = gguf.GGUFWriter(args.out, arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.moe.experts.d_ff)
    w.add_expert_feed_forward_length(cfg.moe.experts.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.head_size)
    w.add_value_length(cfg.head_size)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_expert_count(cfg.moe.num_experts)
    w.add_expert_used_count(cfg.moe.router.top_k)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_tokenizer_model("no_vocab")
    w.add_vocab_size(cfg.vocab_size)
    specs = list(tensors(cfg))
    for name, shape, matrix in specs:
        n = math.prod(shape)
        if matrix:
            w.add_tensor_info(name, shape, np.dtype(np.uint16), n * 2, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), n * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0, nbytes = time.perf_counter(), 0
    for name, shape, matrix in specs:
        if matrix:
            t = (torch.randn(shape, generator=g, device=device) / math.sqrt(shape[-1])).to(torch.bfloat16)
            arr = t.view(torch.int16).cpu().numpy().view(np.uint16)
        elif name.endswith("ffn_gate_inp.weight"):
            arr = (torch.randn(shape, generator=g, device=device) * 0.02).cpu().numpy()
        else:
            arr = np.ones(shape, dtype=np.float32)
        w.write_tensor_data(arr)
        nbytes += arr.nbytes
    w.close()
    print(f"wrote {args.out}: {arch}, {len(specs)} tensors, {nbytes / 2**30:.2f} GiB "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
