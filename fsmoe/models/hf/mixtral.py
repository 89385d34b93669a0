"""Mixtral (``MixtralForCausalLM``): GQA attention, softmax top-k router with renormalised weights,
SwiGLU experts ``w1`` (gate), ``w3`` (up), ``w2`` (down); every layer MoE."""
from __future__ import annotations

from fsmoe.config import ModelConfig
from fsmoe.models.hf.family import (Family, check_llama_moe, check_top_k, exportable, field, hf_common, llama_common,
                                    require)
from fsmoe.models.hf.mapping import Rule

MOE = "model.layers.{i}.block_sparse_moe"

TABLE = [
    Rule("tok_emb.weight", "model.embed_tokens.weight", scope="global"),
    Rule("norm.weight", "model.norm.weight", scope="global"),
    Rule("lm_head.weight", "lm_head.weight", scope="global", when=lambda c: not c.tie_embeddings),
    Rule("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    Rule("layers.{i}.attn.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    Rule("layers.{i}.attn.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    Rule("layers.{i}.attn.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    Rule("layers.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    Rule("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    Rule("layers.{i}.ffn.router.proj.weight", MOE + ".gate.weight", scope="moe"),
    Rule("layers.{i}.ffn.experts.w1_EDF", MOE + ".experts.{e}.w1.weight", "experts", scope="moe"),
    Rule("layers.{i}.ffn.experts.w3_EDF", MOE + ".experts.{e}.w3.weight", "experts", scope="moe"),
    Rule("layers.{i}.ffn.experts.w2_EFD", MOE + ".experts.{e}.w2.weight", "experts", scope="moe"),
]


def model_config(hf: dict) -> dict:
    top_k = field(hf, "num_experts_per_tok")
    check_top_k(top_k, True, "num_experts_per_tok")
    window = hf.get("sliding_window")
    model = llama_common(hf)
    if window is not None:  # attention never slides when no sequence is longer than the window
        require(window > 0, "sliding_window", window, "must be > 0 or null")
        model["max_seq_len"] = min(model["max_seq_len"], window)
    model["moe"] = {
        "num_experts": field(hf, "num_local_experts"),
        "router": {"name": "gshard", "top_k": top_k, "normalize_weights": True,
                   "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.02))},
        "experts": {"d_ff": field(hf, "intermediate_size"), "activation": "swiglu"},
    }
    return model


def hf_config(cfg: ModelConfig) -> dict:
    name = FAMILY.name
    check_llama_moe(cfg, name)
    r = cfg.moe.router
    exportable(cfg.attention == "mha" and not cfg.qk_norm, "qk_norm", cfg.qk_norm, name,
               "must be false with attention='mha'")
    exportable(r.name == "gshard" and r.normalize_weights, "moe.router.name", r.name, name,
               "must be 'gshard' with normalize_weights=true")
    exportable(cfg.moe.experts.num_shared == 0, "moe.experts.num_shared", cfg.moe.experts.num_shared, name, "must be 0")
    exportable(cfg.first_dense == 0 and cfg.moe_every == 1, "first_dense", cfg.first_dense, name,
               "must be 0 with moe_every=1 (every layer MoE)")
    exportable(cfg.moe.experts.d_ff == cfg.d_ff, "d_ff", cfg.d_ff, name,
               f"must equal model.moe.experts.d_ff={cfg.moe.experts.d_ff} (one intermediate_size)")
    out = hf_common(cfg, FAMILY)
    out.update(head_dim=cfg.head_size, num_local_experts=cfg.moe.num_experts, num_experts_per_tok=r.top_k,
               router_aux_loss_coef=r.aux_loss_coef, router_jitter_noise=0.0, sliding_window=None)
    return out


FAMILY = Family("mixtral", "MixtralForCausalLM", "mixtral", TABLE, model_config, hf_config)
