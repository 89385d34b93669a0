"""Model FLOPs per token, for MFU (model FLOPs utilisation), as PaLM (Chowdhery et al. 2022, App. B) counts them:

    6 * N_active + 12 * layers * (heads * head_dim) * L     (MLA: 6 * layers * heads * (d_qk + d_v) * L)

N_active: parameters one token uses (routed experts counted top_k times, not num_experts), except
the embedding lookups (no matmul) but with the LM head (a matmul even when tied to the embedding).
The second term is attention's scores and values, counted in full as is customary (a causal kernel
skips half of them). 6 = 2 (multiply-add) x 3 (forward, and backward's two GEMMs). Recomputed
activations are not counted: MFU measures useful work.
"""
from __future__ import annotations

from fsmoe.config import ModelConfig

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}
"""Dense bf16 tensor-core peak from the vendors' datasheets (no sparsity), keyed by a substring of
the device name."""


def flops_per_token(cfg: ModelConfig, active_params: int, seq_len: int) -> float:
    """Training FLOPs per token of a model with ``active_params`` parameters per token (the global
    model's count, e.g. ``Trainer.parameter_counts()[1]``) at sequence length ``seq_len``."""
    lookups = cfg.vocab_size * cfg.d_model + (cfg.max_seq_len * cfg.d_model if cfg.arch == "gpt" else 0)
    matmul_params = active_params - lookups + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    if cfg.attention == "mla":  # scores over qk_nope + qk_rope dims, values over v_head_dim
        dk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        dk = dv = cfg.head_size
    return 6.0 * matmul_params + 6.0 * cfg.n_layers * cfg.n_heads * (dk + dv) * seq_len


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by name; None when unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
