"""What one Hugging Face model family is to the converter, and the config helpers the families share.

A :class:`Family` pairs a tensor table (fsmoe.models.hf.mapping) with the two config translations:
``config.json`` -> fsmoe's ``model`` section, and back. Each translation refuses, naming the
field, any HF setting that fsmoe's model would compute differently (rather than approximating).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fsmoe.config import ConfigError, ModelConfig
from fsmoe.models.hf.mapping import Rule


class ConversionError(ConfigError):
    """A Hugging Face directory or an fsmoe run cannot be converted; names the file (and the
    tensor or config field) and what is expected."""


@dataclass(frozen=True)
class Family:
    name: str  # what fsmoe calls it: mixtral | qwen3_moe | deepseek_v3
    architecture: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    table: list[Rule]
    model_config: Callable[[dict], dict]  # config.json -> fsmoe's model section
    hf_config: Callable[[ModelConfig], dict]  # fsmoe model -> config.json (raises if not expressible)
    rope_interleaved: Callable[[dict], bool] = lambda hf: False


_MISSING = object()


def field(hf: dict, key: str, default: Any = _MISSING) -> Any:
    """``hf[key]``, or ``default``; a required key that is missing is a ConversionError."""
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is _MISSING:
        raise ConversionError(f"config.json: {key}", None, "is required and missing")
    return default


def count(hf: dict, key: str, default: Any = _MISSING) -> int:
    """:func:`field` that must be a whole number >= 1 (a size or a count)."""
    value = field(hf, key, default)
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, value,
            "must be a whole number >= 1")
    return value


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConversionError(f"config.json: {key}", value, allowed)


def rope(hf: dict) -> tuple[float, dict]:
    """(RoPE base, fsmoe's ``rope_scaling`` table) from ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (older configs). Plain RoPE and YaRN are computed as HF does;
    other scalings are refused."""
    for key in ("rope_scaling", "rope_parameters"):
        require(isinstance(hf.get(key) or {}, dict), key, hf.get(key), "must be a table of RoPE settings")
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    require(kind in ("default", "yarn"), "rope_parameters.rope_type", kind, "allowed values are ['default', 'yarn']")
    if kind == "default":
        return theta, {"kind": "none"}
    require(params.get("attention_factor") is None, "rope_parameters.attention_factor", params.get("attention_factor"),
            "must be unset (fsmoe derives it from factor, mscale and mscale_all_dim)")
    original = count(params, "original_max_position_embeddings")
    factor = params.get("factor") or count(hf, "max_position_embeddings") / original
    return theta, {"kind": "yarn", "factor": float(factor), "original_max_seq_len": int(original),
                   "beta_fast": float(params.get("beta_fast") or 32), "beta_slow": float(params.get("beta_slow") or 1),
                   "mscale": float(params.get("mscale") or 0),
                   "mscale_all_dim": float(params.get("mscale_all_dim") or 0),
                   "truncate": bool(params.get("truncate", True))}


def hf_rope(cfg: ModelConfig) -> dict:
    """``rope_parameters`` of config.json for fsmoe's RoPE settings."""
    s = cfg.rope_scaling
    if s.kind == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": s.factor,
            "original_max_position_embeddings": s.original_max_seq_len, "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow, "mscale": s.mscale, "mscale_all_dim": s.mscale_all_dim, "truncate": s.truncate}


def llama_common(hf: dict) -> dict:
    """The model fields every family shares (RMSNorm, RoPE, SwiGLU decoder)."""
    act = field(hf, "hidden_act", "silu")
    require(act == "silu", "hidden_act", act, "allowed values are ['silu'] (SwiGLU experts)")
    require(not hf.get("attention_bias", False), "attention_bias", hf.get("attention_bias"),
            "must be false: fsmoe's llama attention has no biases")
    d_model, n_heads = count(hf, "hidden_size"), count(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    theta, scaling = rope(hf)
    return {
        "arch": "llama", "vocab_size": count(hf, "vocab_size"), "d_model": d_model,
        "n_layers": count(hf, "num_hidden_layers"), "n_heads": n_heads,
        "n_kv_heads": count(hf, "num_key_value_heads", n_heads),
        "head_dim": None if head_dim in (None, d_model // n_heads) else head_dim,
        "d_ff": count(hf, "intermediate_size"), "max_seq_len": count(hf, "max_position_embeddings"),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "rope_theta": theta, "rope_scaling": scaling,
        "norm_eps": float(field(hf, "rms_norm_eps", 1e-6)), "dropout": 0.0,
    }


def hf_common(cfg: ModelConfig, family: Family) -> dict:
    """config.json fields every family shares."""
    return {
        "architectures": [family.architecture], "model_type": family.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "rope_parameters": hf_rope(cfg),
        "attention_dropout": 0.0, "attention_bias": False, "use_cache": True,
    }


def exportable(ok: bool, name: str, value: Any, family: str, allowed: str) -> None:
    """An fsmoe model field that the HF ``family`` cannot express."""
    if not ok:
        raise ConversionError(f"model.{name}", value, f"{allowed} to export as {family}")


def check_llama_moe(cfg: ModelConfig, family: str) -> None:
    """What every exported family needs from an fsmoe model."""
    exportable(cfg.arch == "llama", "arch", cfg.arch, family, "must be 'llama'")
    exportable(cfg.moe.experts.activation == "swiglu", "moe.experts.activation", cfg.moe.experts.activation,
               family, "must be 'swiglu'")
    exportable(cfg.moe.router.capacity_factor is None, "moe.router.capacity_factor", cfg.moe.router.capacity_factor,
               family, "must be unset (dropless)")


def moe_layout(hf: dict, key: str, sparse: Callable[[int], bool], n_layers: int) -> dict:
    """(first_dense, moe_every) that reproduce the HF rule ``sparse(i)`` for every layer."""
    for first in range(n_layers + 1):
        for every in range(1, n_layers + 1):
            probe = ModelConfig(n_layers=n_layers, first_dense=first, moe_every=every)
            if all(probe.is_moe_layer(i) == sparse(i) for i in range(n_layers)):
                return {"first_dense": first, "moe_every": every}
    raise ConversionError(f"config.json: {key}", hf.get(key), "this pattern of dense and MoE layers is not "
                          "'first_dense leading dense layers, then every moe_every-th layer MoE'")


def check_top_k(top_k: int, normalized: bool, key: str) -> None:
    """HF renormalises a single chosen weight to 1; fsmoe keeps a top-1 router's probability."""
    require(not (normalized and top_k == 1), key, top_k, "must be >= 2 when the top-k weights are renormalised "
            "(fsmoe keeps the router probability of a top-1 choice)")
