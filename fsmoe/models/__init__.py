"""Decoder models: GPT2-XL-MoE (``arch='gpt'``) and the Mixtral / Qwen3 / DeepSeek-V3 family
(``arch='llama'``), built from one block implementation. Entry point: :func:`build_model`."""
from fsmoe.models.attention import Attention
from fsmoe.models.block import Block, MoELayerFactory, default_moe_layer
from fsmoe.models.decoder import ModelOutput, MoEDecoder, build_model
from fsmoe.models.mla import MultiHeadLatentAttention
from fsmoe.models.norms import RMSNorm, build_norm
from fsmoe.models.rope import RotaryEmbedding, apply_rope

__all__ = [
    "Attention", "Block", "ModelOutput", "MoEDecoder", "MoELayerFactory", "MultiHeadLatentAttention",
    "RMSNorm", "RotaryEmbedding", "apply_rope", "build_model", "build_norm", "default_moe_layer",
]
