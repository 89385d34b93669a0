"""MoEDecoder: a causal decoder whose FFNs are dense or MoE, for both model families.

Shape legend: B batch, L sequence length, D model dim, V vocabulary.

    idx_BL --tok_emb (+ pos_emb for gpt)--> x_BLD --n_layers x Block--> norm --lm_head--> logits_BLV

``arch='gpt'`` (GPT2-XL-MoE): learned absolute positions; ``arch='llama'`` (Mixtral, Qwen3,
DeepSeek-V3): RoPE tables computed once here and handed to every block. Which layers are MoE is
``ModelConfig.is_moe_layer``: ``first_dense`` leading dense layers, then every ``moe_every``-th.

Generation (fsmoe.infer) passes a KV cache, the slot of the first new token and each row's
left padding: ``model(idx_BL, cache=..., start=..., pad_B=...)`` (fsmoe.models.kv_cache).

Build on the meta device for parameter counts without allocating:
``with torch.device("meta"): build_model(cfg)``; ``model.to_empty(device=...)`` then
``model.reset_parameters()`` materialises it with the weights a direct build would have.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.config import ModelConfig
from fsmoe.layer import MoEStats
from fsmoe.models.block import MoELayerFactory, build_block, default_moe_layer
from fsmoe.models.init import init_weights, module_seed, seeded
from fsmoe.models.kv_cache import Attend, KVCache, Start, attend_mask, positions
from fsmoe.models.norms import build_norm
from fsmoe.models.rope import RotaryEmbedding
from fsmoe.precision import to_compute


@dataclass(frozen=True)
class ModelOutput:
    logits: Tensor  # [B, L, V]
    aux_loss: Tensor  # scalar: sum of every MoE layer's weighted auxiliary losses (has grad)
    moe_stats: list[MoEStats]  # one per MoE layer, in layer order


ALIGN_ROWS = 64  # output features padded to a multiple of this for the head's GEMMs on CUDA


def aligned_linear(x_BLD: Tensor, weight_VD: Tensor, multiple: int) -> Tensor:
    """x_BLD @ weight_VD.T -> [B, L, V], with V padded to a multiple of ``multiple`` for the GEMMs
    and sliced back (exact: the padded rows are zeros and never read).

    A row stride such as GPT-2's 50257 is not 16-byte aligned, so cuBLAS falls back to
    alignment-1 kernels for the head's forward and both backward GEMMs (about 3x slower; 25 ms
    of a 150 ms step for gpt2-xl-moe at 8k tokens per GPU on an H200). The padding copy of the
    weight costs far less than that."""
    pad = (-weight_VD.shape[0]) % multiple
    if pad == 0:
        return F.linear(x_BLD, weight_VD)
    return F.linear(x_BLD, F.pad(weight_VD, (0, 0, 0, pad)))[..., :weight_VD.shape[0]]


class MoEDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_layer_factory: MoELayerFactory | None = None,
                 seed: int | None = None):
        super().__init__()
        cfg.validate()  # a ModelConfig built by hand has not been validated yet
        self.cfg = cfg
        # Drawn before anything else consumes the global RNG: torch.manual_seed(s) fixes the model.
        self.seed = int(torch.randint(0, 2**62, (1,), device="cpu").item()) if seed is None else seed
        # The rest never moves the global RNG (the constructors' own draws are replaced by
        # reset_parameters below), so a model built on the meta device and materialised per rank
        # (fsmoe.parallel.build) leaves training's random stream where a model built whole does.
        with seeded(module_seed(self.seed, "")):
            self._build(cfg, moe_layer_factory or default_moe_layer)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def _build(self, cfg: ModelConfig, factory: MoELayerFactory) -> None:
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt" else None
        rot_dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_size
        self.rope = (RotaryEmbedding(rot_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
                     if cfg.arch == "llama" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList()
        for i in range(cfg.n_layers):
            with seeded(module_seed(self.seed, f"layers.{i}")):  # constructors' draws: per layer
                self.layers.append(build_block(cfg, i, factory))
        self.norm = build_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def reset_parameters(self, seed: int | None = None) -> None:
        """(Re)initialise all weights from ``seed`` (default: the seed the model was built with),
        e.g. after ``to_empty`` materialised a meta-built model. No-op on the meta device."""
        init_weights(self, self.seed if seed is None else seed, self.cfg.init_std, self.cfg.n_layers)

    def forward(self, idx_BL: Tensor, *, cache: KVCache | None = None, start: Start = 0,
                pad_B: Tensor | None = None) -> ModelOutput:
        """idx_BL: [B, L] int64 token ids, L <= max_seq_len. Returns logits [B, L, V] and MoE stats.

        Generation only (all None/0 in training): ``cache`` receives the new tokens at slots
        ``[start, start + L)``, attention reads every slot so far; ``pad_B`` [B] int64 is each
        row's left padding (default none). Without a cache ``start`` must be 0. A 0-dim device
        tensor ``start`` keeps every shape fixed (CUDA graphs, fsmoe.infer.decode_graph); its
        caller checks ``start + L <= min(max_seq_len, cache slots)``, which needs the host."""
        L = idx_BL.shape[1]
        static = isinstance(start, Tensor)
        if static and cache is None:
            raise ValueError("a tensor start (static shapes) needs a KV cache")
        if not static and start + L > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + L} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if cache is None and start:
            raise ValueError(f"start={start} needs a KV cache holding the earlier slots")
        generating = cache is not None or pad_B is not None
        if generating and pad_B is None:
            pad_B = torch.zeros(idx_BL.shape[0], dtype=torch.long, device=idx_BL.device)
        x_BLD = self.tok_emb(idx_BL)
        if self.pos_emb is not None:
            pos = positions(pad_B, start, L) if generating else torch.arange(L, device=idx_BL.device)
            x_BLD = x_BLD + self.pos_emb(pos)
        x_BLD = to_compute(x_BLD)  # under autocast the residual stream is bf16 (fsmoe.precision)
        rope = None
        if self.rope is not None:
            rope = self.rope.at(positions(pad_B, start, L)) if generating else self.rope(L)
        mask = attend_mask(pad_B, start, L, cache.slots if static else None) if generating else None
        x_BLD = self.drop(x_BLD)
        stats: list[MoEStats] = []
        for i, block in enumerate(self.layers):
            attend = Attend(start, mask, cache.layers[i] if cache is not None else None) if generating else None
            x_BLD, s = block(x_BLD, rope, attend) if attend is not None else block(x_BLD, rope)
            if s is not None:
                stats.append(s)
        logits_BLV = aligned_linear(self.norm(x_BLD), self.lm_head.weight, ALIGN_ROWS if x_BLD.is_cuda else 1)
        aux = torch.stack([s.aux_loss for s in stats]).sum() if stats else logits_BLV.new_zeros(())
        return ModelOutput(logits_BLV, aux, stats)

    def moe_layers(self) -> list[nn.Module]:
        """The MoE layers, in layer order (the same order as ``ModelOutput.moe_stats``)."""
        return [block.ffn for block in self.layers if block.is_moe]

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameters of this module (tied weights once). ``active_only``: those one token uses,
        i.e. everything except the routed experts, plus ``top_k`` routed experts per MoE layer.
        On a sharded model both count this rank's shard."""
        total = sum(p.numel() for p in self.parameters())
        if not active_only:
            return total
        for layer in self.moe_layers():
            routed = sum(p.numel() for p in layer.experts.parameters())
            per_expert = routed // layer.experts.num_experts
            total -= routed - layer.cfg.router.top_k * per_expert
        return total


def build_model(cfg: ModelConfig, moe_layer_factory: MoELayerFactory | None = None,
                seed: int | None = None) -> MoEDecoder:
    """Build the decoder described by ``cfg``.

    moe_layer_factory: ``(layer_idx, moe_cfg, d_model) -> module`` with MoELayer's interface
    (``forward(x) -> (y, MoEStats)``, attributes ``cfg``, ``router`` and ``experts`` with
    ``experts.num_experts`` = experts held locally, used by ``num_parameters``); the distributed code
    uses it to inject dispatchers and sharded experts. Default: ``MoELayer(moe_cfg, d_model)``.
    seed: init seed; None draws it from torch's global RNG (see ``MoEDecoder.reset_parameters``).
    """
    return MoEDecoder(cfg, moe_layer_factory, seed)
