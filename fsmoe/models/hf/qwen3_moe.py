"""Qwen3-MoE (``Qwen3MoeForCausalLM``): GQA attention with per-head q/k RMSNorm, an explicit
head_dim, softmax top-k router (renormalised if ``norm_topk_prob``), SwiGLU experts ``gate_proj``,
``up_proj``, ``down_proj``; ``mlp_only_layers`` / ``decoder_sparse_step`` make some layers dense."""
from __future__ import annotations

from fsmoe.config import ModelConfig
from fsmoe.models.hf.family import (Family, check_llama_moe, check_top_k, exportable, field, hf_common, llama_common,
                                    moe_layout, require)
from fsmoe.models.hf.mapping import Rule

ATTN, MLP = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"

TABLE = [
    Rule("tok_emb.weight", "model.embed_tokens.weight", scope="global"),
    Rule("norm.weight", "model.norm.weight", scope="global"),
    Rule("lm_head.weight", "lm_head.weight", scope="global", when=lambda c: not c.tie_embeddings),
    Rule("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    Rule("layers.{i}.attn.wq.weight", ATTN + ".q_proj.weight"),
    Rule("layers.{i}.attn.wk.weight", ATTN + ".k_proj.weight"),
    Rule("layers.{i}.attn.wv.weight", ATTN + ".v_proj.weight"),
    Rule("layers.{i}.attn.wo.weight", ATTN + ".o_proj.weight"),
    Rule("layers.{i}.attn.q_norm.weight", ATTN + ".q_norm.weight"),
    Rule("layers.{i}.attn.k_norm.weight", ATTN + ".k_norm.weight"),
    Rule("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    Rule("layers.{i}.ffn.w1.weight", MLP + ".gate_proj.weight", scope="dense"),
    Rule("layers.{i}.ffn.w3.weight", MLP + ".up_proj.weight", scope="dense"),
    Rule("layers.{i}.ffn.w2.weight", MLP + ".down_proj.weight", scope="dense"),
    Rule("layers.{i}.ffn.router.proj.weight", MLP + ".gate.weight", scope="moe"),
    Rule("layers.{i}.ffn.experts.w1_EDF", MLP + ".experts.{e}.gate_proj.weight", "experts", scope="moe"),
    Rule("layers.{i}.ffn.experts.w3_EDF", MLP + ".experts.{e}.up_proj.weight", "experts", scope="moe"),
    Rule("layers.{i}.ffn.experts.w2_EFD", MLP + ".experts.{e}.down_proj.weight", "experts", scope="moe"),
]


def model_config(hf: dict) -> dict:
    top_k, norm = field(hf, "num_experts_per_tok"), bool(hf.get("norm_topk_prob", False))
    check_top_k(top_k, norm, "num_experts_per_tok")
    require(not hf.get("use_sliding_window", False), "use_sliding_window", hf.get("use_sliding_window"),
            "must be false: fsmoe attends over the whole sequence")
    model = llama_common(hf)
    n_layers, step = model["n_layers"], field(hf, "decoder_sparse_step", 1)
    dense_only = set(hf.get("mlp_only_layers") or [])
    model.update(moe_layout(hf, "mlp_only_layers", lambda i: i not in dense_only and (i + 1) % step == 0, n_layers))
    model["qk_norm"] = True
    model["head_dim"] = field(hf, "head_dim", model["d_model"] // model["n_heads"])
    num_experts = hf.get("num_experts") or field(hf, "num_local_experts")
    model["moe"] = {
        "num_experts": num_experts,
        "router": {"name": "gshard", "top_k": top_k, "normalize_weights": norm,
                   "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001))},
        "experts": {"d_ff": field(hf, "moe_intermediate_size"), "activation": "swiglu"},
    }
    return model


def hf_config(cfg: ModelConfig) -> dict:
    name = FAMILY.name
    check_llama_moe(cfg, name)
    r = cfg.moe.router
    exportable(cfg.attention == "mha" and cfg.qk_norm, "qk_norm", cfg.qk_norm, name,
               "must be true with attention='mha'")
    exportable(r.name == "gshard", "moe.router.name", r.name, name, "must be 'gshard'")
    exportable(cfg.moe.experts.num_shared == 0, "moe.experts.num_shared", cfg.moe.experts.num_shared, name, "must be 0")
    out = hf_common(cfg, FAMILY)
    out.update(head_dim=cfg.head_size, num_experts=cfg.moe.num_experts, num_experts_per_tok=r.top_k,
               norm_topk_prob=r.normalize_weights, moe_intermediate_size=cfg.moe.experts.d_ff,
               decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
               router_aux_loss_coef=r.aux_loss_coef, use_sliding_window=False, sliding_window=None)
    return out


FAMILY = Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", TABLE, model_config, hf_config)
