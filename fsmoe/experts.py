"""Routed and shared expert FFNs, computed as grouped matmuls over all local experts.

Shape legend: N rows (assignments) grouped by expert, D model dim, F hidden dim of this shard
(d_ff / esp), E local experts.

Weights: ``w1_EDF`` (gate/up), ``w3_EDF`` (up, SwiGLU only), ``w2_EFD`` (down). Expert sharding
(ESP) splits F: each shard computes a partial ``[N, D]`` output that the ESP ReduceScatter (or
AllReduce) sums; ``f_offset`` says which columns of the full expert this shard holds, so a sharded
layer can be initialised and checkpointed as slices of the one global tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmoe.kernels.expert_gemm import triton_swiglu_mlp
from fsmoe.kernels.expert_loop import per_expert_mlp
from fsmoe.kernels.experts import expert_mlp
from fsmoe.kernels.grouped_mm import grouped_mm, grouped_mm_supported
from fsmoe.kernels.tiles import MLPTiles
from fsmoe.precision import cast_weights, to_compute


def reference_mlp(x_ND: Tensor, w1_EDF: Tensor, w3_EDF: Tensor | None, w2_EFD: Tensor, offs_E: Tensor) -> Tensor:
    """The expert MLP in plain PyTorch: SwiGLU (``w3`` given) or GeLU over rows grouped by expert;
    ``offs_E`` [E] int32 cumulative row ends. Rows past ``offs[-1]`` give 0 and pass no gradient."""
    h = grouped_mm(x_ND, w1_EDF, offs_E)
    h = F.silu(h) * grouped_mm(x_ND, w3_EDF, offs_E) if w3_EDF is not None else F.gelu(h)
    return grouped_mm(h, w2_EFD, offs_E)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu",
                 esp: int = 1, esp_rank: int = 0):
        super().__init__()
        if d_ff % esp:
            raise ValueError(f"experts.d_ff={d_ff} must be divisible by esp={esp}")
        self.num_experts, self.d_model, self.d_ff_full = num_experts, d_model, d_ff
        self.activation, self.esp, self.esp_rank = activation, esp, esp_rank
        F_ = d_ff // esp
        self.f_offset = esp_rank * F_
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, F_))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, F_)) if activation == "swiglu" else None
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, F_, d_model))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Init the *full* [E, D, d_ff] tensors from ``generator`` and keep this shard's slice,
        so every ESP layout starts from the same global weights."""
        sl = slice(self.f_offset, self.f_offset + self.w1_EDF.shape[2])
        with torch.no_grad():
            for name, p in self.named_parameters():
                full_shape = list(p.shape)
                f_dim = 2 if name != "w2_EFD" else 1
                full_shape[f_dim] = self.d_ff_full
                fan_in = self.d_model if name != "w2_EFD" else self.d_ff_full
                full = torch.randn(full_shape, generator=generator, device=p.device) / math.sqrt(fan_in)
                p.copy_(full[:, :, sl] if f_dim == 2 else full[:, sl, :])

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        """x_ND: [N, D] rows grouped by expert, tokens_per_expert_E: [E] int (rows of each expert,
        summing to <= N). Returns [N, D]; rows past the last expert's end are 0 (and pass no gradient).
        Under autocast the GEMMs run in its dtype (see fsmoe.precision)."""
        x_ND, weights = self.compute_operands(x_ND)
        return reference_mlp(x_ND, *weights, torch.cumsum(tokens_per_expert_E, 0).to(torch.int32))

    def compute_operands(self, x_ND: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor | None, Tensor]]:
        """x_ND and (w1, w3, w2) in the compute dtype: autocast's when active (grouped_mm is not
        on its list, so the fp32 master weights are cast here), else x's own."""
        x_ND = to_compute(x_ND)
        return x_ND, cast_weights(x_ND, self.w1_EDF, self.w3_EDF, self.w2_EFD)


class FusedGroupedExperts(GroupedExperts):
    """The same experts on the GPU fast path: the fused SwiGLU, only the tail rows past the last
    expert masked, and the GEMMs torch's grouped_mm (CUTLASS, ``fsmoe.kernels.experts``), ours
    (``fsmoe.kernels.expert_gemm``) or one cuBLAS GEMM per expert (``fsmoe.kernels.expert_loop``),
    as ``experts.gemm`` says (``use_gemm``). CPU tensors, and dtypes or shapes grouped_mm does not
    take, use the reference forward."""

    gemm = "auto"  # auto | torch | triton | cublas: see ExpertsConfig.gemm

    def use_gemm(self, gemm: str) -> None:
        self.gemm = gemm

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        """x_ND: [N, D] rows grouped by expert, tokens_per_expert_E: [E] int. Returns [N, D];
        rows past the last expert's end are 0 (and pass no gradient)."""
        x_ND, (w1_EDF, w3_EDF, w2_EFD) = self.compute_operands(x_ND)  # bf16 under autocast
        offs_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        if not (x_ND.is_cuda and grouped_mm_supported(x_ND, w1_EDF)
                and grouped_mm_supported(x_ND.new_empty(0, w2_EFD.shape[1]), w2_EFD)):
            return reference_mlp(x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E)
        path, tiles = self.choose_path(x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E)
        if path == "triton":
            return triton_swiglu_mlp(x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E, tiles)
        if path == "cublas":
            return per_expert_mlp(x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E)
        return expert_mlp(x_ND, w1_EDF, w3_EDF, w2_EFD, offs_E)

    def choose_path(self, x_ND: Tensor, w1_EDF: Tensor, w3_EDF: Tensor | None, w2_EFD: Tensor,
                    offs_E: Tensor | None = None) -> tuple[str, MLPTiles | None]:
        """("triton", our tiles), ("torch", None) or ("cublas", None): forced by ``gemm``, or
        measured fastest at this shape (``auto``, on the routing of the first forward there,
        ``offs_E``; SwiGLU only, GeLU experts take torch's path).
        The per-expert path syncs on the host, so inside a CUDA-graph capture torch's runs."""
        capturing = torch.cuda.is_current_stream_capturing()
        if self.gemm == "torch" or (self.gemm == "cublas" and capturing) or (self.gemm != "cublas" and w3_EDF is None):
            return "torch", None
        if self.gemm == "cublas":
            return "cublas", None
        from fsmoe.kernels import gmm_tune

        choice = gmm_tune.choose(x_ND, w1_EDF, w2_EFD, offs_E=offs_E)
        if choice is None:  # inside a CUDA-graph capture at a shape never measured
            return ("triton", MLPTiles()) if self.gemm == "triton" else ("torch", None)
        if self.gemm == "triton":
            if choice.triton_ms == float("inf"):
                from fsmoe.config import ConfigError

                raise ConfigError("moe.experts.gemm", "triton", "none of fsmoe's Triton grouped GEMMs compiles on "
                                  "this card (see the message above); use 'auto' or 'torch'")
            return "triton", choice.tiles
        path = choice.path(capturing)
        return path, (choice.tiles if path == "triton" else None)


class DenseFFN(nn.Module):
    """A plain FFN (shared experts, dense layers): SwiGLU or GeLU."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(d_model, d_ff, bias=bias)
        self.w3 = nn.Linear(d_model, d_ff, bias=bias) if activation == "swiglu" else None
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)
        h = F.silu(h) * self.w3(x) if self.w3 is not None else F.gelu(h)
        return self.w2(h)
