"""Tiny random Hugging Face models of the three families, built by ``transformers`` itself from a
config and saved with ``save_pretrained`` (nothing is downloaded), for the conversion tests.

Every parameter and buffer is redrawn at random (norm weights and DeepSeek's routing bias too, which
HF initialises to constants), so a tensor mapped to the wrong place cannot go unnoticed.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256  # fsmoe train's byte data fits, so --init-from can train on it

CONFIGS = {
    "mixtral": ("MixtralConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, norm_topk_prob=True, mlp_only_layers=[0], rms_norm_eps=1e-6)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        max_position_embeddings=64, rms_norm_eps=1e-6)),
}


def build(family: str, seed: int = 0, **overrides):
    """A random-weight ``*ForCausalLM`` of ``family`` in eval mode (float32)."""
    import transformers

    cls_name, kwargs = CONFIGS[family]
    cfg = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and "inv_freq" not in name:
                std, mean = (0.2 if t.dim() > 1 else 0.1), (1.0 if "norm" in name else 0.0)
                t.copy_(torch.randn(t.shape, generator=g) * std + mean)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def save(family: str, root: Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    out = Path(root) / family
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    build(family, seed, **overrides).save_pretrained(out, **kwargs)
    return out
