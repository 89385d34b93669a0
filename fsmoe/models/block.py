"""One pre-norm decoder block, shared by both model families, and the builders that pick its parts.

Shape legend: B batch, L sequence length, D model dim.

    h = x + drop(attn(attn_norm(x)))
    y = h + drop(ffn(ffn_norm(h)))        ffn: dense MLP, or an MoE layer that also returns MoEStats

``arch='gpt'``: LayerNorm, biases, GeLU MLP. ``arch='llama'``: RMSNorm, no biases, SwiGLU MLP.
Attention is grouped-query (``attention='mha'``) or latent (``attention='mla'``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fsmoe.config import ModelConfig, MoEConfig
from fsmoe.experts import DenseFFN
from fsmoe.layer import MoELayer, MoEStats
from fsmoe.models.attention import Attention
from fsmoe.models.kv_cache import Attend
from fsmoe.models.mla import MultiHeadLatentAttention
from fsmoe.models.norms import build_norm
from fsmoe.models.rope import RopeTables, yarn_mscale
from fsmoe.recompute import checkpointed

# (layer_idx, moe_cfg, d_model) -> a module with MoELayer's interface: forward(x) -> (y, MoEStats).
MoELayerFactory = Callable[[int, MoEConfig, int], nn.Module]


def default_moe_layer(layer_idx: int, moe_cfg: MoEConfig, d_model: int) -> nn.Module:
    """One process, every expert local."""
    return MoELayer(moe_cfg, d_model)


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "mla":
        rs = cfg.rope_scaling  # YaRN also sharpens MLA's softmax (DeepSeek-V3), by mscale_all_dim
        m = yarn_mscale(rs.factor, rs.mscale_all_dim) if rs.kind == "yarn" and rs.mscale_all_dim else 1.0
        scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * m * m
        return MultiHeadLatentAttention(
            cfg.d_model, cfg.n_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim, dropout=cfg.dropout, scale=scale,
            norm_eps=cfg.norm_eps if cfg.latent_norm_eps is None else cfg.latent_norm_eps)
    return Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size, bias=cfg.arch == "gpt",
                     qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, dropout=cfg.dropout)


def build_dense_ffn(cfg: ModelConfig) -> nn.Module:
    """GPT-2: GeLU with biases; llama family: SwiGLU without. Separate w1/w2/w3 Linears for TP."""
    if cfg.arch == "gpt":
        return DenseFFN(cfg.d_model, cfg.d_ff, "gelu", bias=True)
    return DenseFFN(cfg.d_model, cfg.d_ff, "swiglu", bias=False)


class Block(nn.Module):
    def __init__(self, attn: nn.Module, ffn: nn.Module, attn_norm: nn.Module, ffn_norm: nn.Module,
                 *, is_moe: bool, dropout: float):
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn
        self.is_moe = is_moe  # fixed at build time: the ffn returns (y, MoEStats) instead of y
        self.drop = nn.Dropout(dropout)
        self.recompute = False  # train.activation_checkpointing="full": keep only x, recompute in backward

    def forward(self, x_BLD: Tensor, rope: RopeTables | None,
                attend: Attend | None = None) -> tuple[Tensor, MoEStats | None]:
        """x_BLD: [B, L, D] -> ([B, L, D], this layer's MoEStats or None for a dense layer).
        ``attend``: generation's mask and this layer's KV cache (None in training)."""
        if self.recompute and torch.is_grad_enabled():
            return checkpointed(self._forward, x_BLD, rope, attend)
        return self._forward(x_BLD, rope, attend)

    def _forward(self, x_BLD: Tensor, rope: RopeTables | None,
                 attend: Attend | None = None) -> tuple[Tensor, MoEStats | None]:
        h_BLD = x_BLD + self.drop(self.attn(self.attn_norm(x_BLD), rope, attend))
        if self.is_moe:
            y_BLD, stats = self.ffn(self.ffn_norm(h_BLD))
        else:
            y_BLD, stats = self.ffn(self.ffn_norm(h_BLD)), None
        return h_BLD + self.drop(y_BLD), stats


def build_block(cfg: ModelConfig, layer_idx: int, moe_layer_factory: MoELayerFactory) -> Block:
    is_moe = cfg.is_moe_layer(layer_idx)
    ffn = moe_layer_factory(layer_idx, cfg.moe, cfg.d_model) if is_moe else build_dense_ffn(cfg)
    return Block(build_attention(cfg), ffn, build_norm(cfg, cfg.d_model), build_norm(cfg, cfg.d_model),
                 is_moe=is_moe, dropout=cfg.dropout)
