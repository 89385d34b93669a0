"""A model ready for generation from what is stored at a path: an fsmoe run directory (its newest
intact checkpoint) or a Hugging Face directory (converted in memory, tensor by tensor)."""
from __future__ import annotations

from pathlib import Path

import torch

from fsmoe.config import ConfigError, ModelConfig, model_config_from_dict
from fsmoe.models import MoEDecoder, RotaryEmbedding, build_model
from fsmoe.models.hf.convert import is_hf_dir, load_weights, source_model
from fsmoe.models.init import reset_buffers


def materialise(model: MoEDecoder, device: torch.device, dtype: torch.dtype, init: bool) -> None:
    """Allocate a meta-built ``model`` on ``device`` in ``dtype`` (once, in the weights' dtype), with
    the usual initial weights when ``init``; the RoPE angle tables and a router's expert bias stay
    float32 whatever the weights' dtype."""
    model.to(dtype)
    model.to_empty(device=device)
    if init:
        model.reset_parameters()
        reset_buffers(model)
    for mod in model.modules():
        if isinstance(mod, RotaryEmbedding):
            mod.to(torch.float32)
            mod.reset_parameters()
    for layer in model.moe_layers():
        if hasattr(layer.router, "expert_bias"):
            layer.router.expert_bias.data = layer.router.expert_bias.data.float()


def load_model(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[MoEDecoder, ModelConfig, bool]:
    """(model in eval mode on ``device`` with weights in ``dtype``, its config, whether ``path``
    holds a converted model (so it needs its own tokenizer)). Built on the meta device first, so
    the host never holds a freshly initialised copy next to the loaded weights."""
    path = Path(path)
    try:
        cfg = model_config_from_dict(source_model(path, "model"))
        cfg.validate()
    except ConfigError as e:
        if e.field_name.startswith("model"):
            raise ConfigError(f"{path / 'config.json'} -> {e.field_name}", e.value, e.allowed) from None
        raise
    with torch.device("meta"):
        model = build_model(cfg, seed=0)
    materialise(model, device, dtype, init=False)
    load_weights(model, path)
    converted = is_hf_dir(path) or (path / "hf_config.json").is_file()
    return model.eval(), cfg, converted
