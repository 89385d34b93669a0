"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention (rotary dims stored in
interleaved pairs when ``rope_interleave``), ``first_k_dense_replace`` dense layers, then MoE
layers with a sigmoid router, ``e_score_correction_bias`` (fsmoe's ``expert_bias``), group-limited
top-k, ``routed_scaling_factor`` and ``n_shared_experts`` shared experts (one wider SwiGLU)."""
from __future__ import annotations

from fsmoe.config import ModelConfig
from fsmoe.models.hf.family import (Family, check_llama_moe, check_top_k, exportable, field, hf_common, llama_common,
                                    require)
from fsmoe.models.hf.mapping import Rule

# HF's q_a_layernorm / kv_a_layernorm use this eps whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6
ATTN, MLP = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"


def _q_lora(cfg: ModelConfig) -> bool:
    return cfg.q_lora_rank > 0


TABLE = [
    Rule("tok_emb.weight", "model.embed_tokens.weight", scope="global"),
    Rule("norm.weight", "model.norm.weight", scope="global"),
    Rule("lm_head.weight", "lm_head.weight", scope="global", when=lambda c: not c.tie_embeddings),
    Rule("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    Rule("layers.{i}.attn.wq_a.weight", ATTN + ".q_a_proj.weight", when=_q_lora),
    Rule("layers.{i}.attn.q_norm.weight", ATTN + ".q_a_layernorm.weight", when=_q_lora),
    Rule("layers.{i}.attn.wq_b.weight", ATTN + ".q_b_proj.weight", "rope_q", when=_q_lora),
    Rule("layers.{i}.attn.wq.weight", ATTN + ".q_proj.weight", "rope_q", when=lambda c: not _q_lora(c)),
    Rule("layers.{i}.attn.wkv_a.weight", ATTN + ".kv_a_proj_with_mqa.weight", "rope_kv"),
    Rule("layers.{i}.attn.kv_norm.weight", ATTN + ".kv_a_layernorm.weight"),
    Rule("layers.{i}.attn.wkv_b.weight", ATTN + ".kv_b_proj.weight"),
    Rule("layers.{i}.attn.wo.weight", ATTN + ".o_proj.weight"),
    Rule("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    Rule("layers.{i}.ffn.w1.weight", MLP + ".gate_proj.weight", scope="dense"),
    Rule("layers.{i}.ffn.w3.weight", MLP + ".up_proj.weight", scope="dense"),
    Rule("layers.{i}.ffn.w2.weight", MLP + ".down_proj.weight", scope="dense"),
    Rule("layers.{i}.ffn.router.proj.weight", MLP + ".gate.weight", scope="moe"),
    Rule("layers.{i}.ffn.router.expert_bias", MLP + ".gate.e_score_correction_bias", scope="moe"),
    Rule("layers.{i}.ffn.experts.w1_EDF", MLP + ".experts.{e}.gate_proj.weight", "experts", scope="moe"),
    Rule("layers.{i}.ffn.experts.w3_EDF", MLP + ".experts.{e}.up_proj.weight", "experts", scope="moe"),
    Rule("layers.{i}.ffn.experts.w2_EFD", MLP + ".experts.{e}.down_proj.weight", "experts", scope="moe"),
    Rule("layers.{i}.ffn.shared.w1.weight", MLP + ".shared_experts.gate_proj.weight", scope="moe"),
    Rule("layers.{i}.ffn.shared.w3.weight", MLP + ".shared_experts.up_proj.weight", scope="moe"),
    Rule("layers.{i}.ffn.shared.w2.weight", MLP + ".shared_experts.down_proj.weight", scope="moe"),
]


def model_config(hf: dict) -> dict:
    top_k, norm = field(hf, "num_experts_per_tok"), bool(hf.get("norm_topk_prob", True))
    check_top_k(top_k, norm, "num_experts_per_tok")
    scoring = hf.get("scoring_func", "sigmoid")
    require(scoring == "sigmoid", "scoring_func", scoring, "allowed values are ['sigmoid']")
    method = hf.get("topk_method", "noaux_tc")
    require(method == "noaux_tc", "topk_method", method, "allowed values are ['noaux_tc']")
    shared = field(hf, "n_shared_experts", 1)  # defaults: those of HF's DeepseekV3Config
    require(isinstance(shared, int) and shared >= 1, "n_shared_experts", shared, "must be an integer >= 1")
    model = llama_common(hf)
    model.update(attention="mla", n_kv_heads=None, head_dim=None, q_lora_rank=hf.get("q_lora_rank") or 0,
                 kv_lora_rank=field(hf, "kv_lora_rank"), qk_rope_head_dim=field(hf, "qk_rope_head_dim"),
                 qk_nope_head_dim=field(hf, "qk_nope_head_dim"), v_head_dim=field(hf, "v_head_dim"),
                 latent_norm_eps=LATENT_NORM_EPS, first_dense=field(hf, "first_k_dense_replace", 3), moe_every=1)
    d_ff = field(hf, "moe_intermediate_size")
    model["moe"] = {
        "num_experts": field(hf, "n_routed_experts"),
        "router": {"name": "deepseek", "top_k": top_k, "normalize_weights": norm,
                   "num_groups": field(hf, "n_group", 8), "topk_groups": field(hf, "topk_group", 4),
                   "routed_scaling": float(field(hf, "routed_scaling_factor", 2.5)), "aux_loss_coef": 0.0},
        "experts": {"d_ff": d_ff, "activation": "swiglu", "num_shared": shared, "shared_d_ff": d_ff},
    }
    return model


def hf_config(cfg: ModelConfig) -> dict:
    name = FAMILY.name
    check_llama_moe(cfg, name)
    r, ex = cfg.moe.router, cfg.moe.experts
    exportable(cfg.attention == "mla", "attention", cfg.attention, name, "must be 'mla'")
    exportable(r.name == "deepseek", "moe.router.name", r.name, name, "must be 'deepseek'")
    exportable(cfg.moe_every == 1, "moe_every", cfg.moe_every, name, "must be 1")
    exportable(ex.num_shared >= 1 and (ex.shared_d_ff or ex.d_ff) == ex.d_ff, "moe.experts.shared_d_ff",
               ex.shared_d_ff, name, "must equal moe.experts.d_ff, with num_shared >= 1")
    exportable(cfg.latent_norm_eps == LATENT_NORM_EPS, "latent_norm_eps", cfg.latent_norm_eps, name,
               f"must be {LATENT_NORM_EPS} (fixed in Hugging Face's DeepSeek-V3)")
    out = hf_common(cfg, FAMILY)
    out.update(num_key_value_heads=cfg.n_heads, head_dim=cfg.qk_rope_head_dim,
               q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
               qk_rope_head_dim=cfg.qk_rope_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
               qk_head_dim=cfg.qk_rope_head_dim + cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim,
               first_k_dense_replace=cfg.first_dense, n_routed_experts=cfg.moe.num_experts,
               n_shared_experts=ex.num_shared, moe_intermediate_size=ex.d_ff, num_experts_per_tok=r.top_k,
               norm_topk_prob=r.normalize_weights, n_group=r.num_groups, topk_group=r.topk_groups,
               routed_scaling_factor=r.routed_scaling, rope_interleave=True, num_nextn_predict_layers=0)
    return out


FAMILY = Family("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3", TABLE, model_config, hf_config,
                rope_interleaved=lambda hf: bool(hf.get("rope_interleave", True)))
