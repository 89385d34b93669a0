"""The GPU memory budget of a hybrid model: what must be on the GPU, and how many experts fit beside it.

Always on the GPU: every weight that is not a routed expert (embeddings, attention, norms, router,
shared experts, head), the KV cache of ``batch`` rows of ``slots`` tokens, the workspace of the
largest forward (``prefill_tokens`` tokens: its hidden states, routed rows, expert hidden
activations and logits), and the two buffers streamed experts land in. What is left holds
resident (GG) experts, each ``per_expert`` bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from fsmoe.config import ConfigError, ModelConfig

GiB = 1 << 30
# Streamed experts are copied and computed a chunk at a time (one grouped GEMM per chunk, fewer
# launches); a chunk is at most 8 experts or 128 MiB, so large experts stream one by one.
MAX_CHUNK = 8
CHUNK_BYTES = 128 << 20


@dataclass(frozen=True)
class GpuMemoryPlan:
    budget: int  # bytes
    dense: int  # weights other than routed experts
    kv_cache: int
    workspace: int
    buffers: int  # two chunks of streamed experts
    per_expert: int
    num_experts: int  # routed experts of the whole model (layers x experts)

    @property
    def chunk(self) -> int:
        """Streamed experts per buffer (the buffers hold two chunks)."""
        return max(1, self.buffers // (2 * self.per_expert))

    @property
    def fixed(self) -> int:
        return self.dense + self.kv_cache + self.workspace + self.buffers

    @property
    def slots(self) -> int:
        """Routed experts that fit resident on the GPU."""
        return max(0, min(self.num_experts, (self.budget - self.fixed) // self.per_expert))

    def rows(self) -> list[tuple[str, float]]:
        """(what, GiB) for a table."""
        return [("dense weights", self.dense / GiB), ("KV cache", self.kv_cache / GiB),
                ("workspace", self.workspace / GiB), ("stream buffers", self.buffers / GiB),
                (f"resident experts ({self.slots} of {self.num_experts})", self.slots * self.per_expert / GiB),
                ("budget", self.budget / GiB)]


def cap_gpu_memory(budget_gb: float, device) -> None:
    """Make the budget real: the caching allocator refuses anything past ``budget_gb`` on ``device``."""
    import torch

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GiB / total), torch.cuda.current_device())


def size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def expert_bytes(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    ex = cfg.moe.experts
    return (3 if ex.activation == "swiglu" else 2) * cfg.d_model * ex.d_ff * dtype_bytes


def workspace_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """Activations of one forward of ``tokens`` tokens, generously: hidden states and attention
    (about 12 x D per token), routed rows and expert activations (k x (4 D + 3 F)), the shared
    experts and the logits (V per token; the decoder computes them for every position)."""
    moe = cfg.moe
    shared = moe.experts.num_shared * (moe.experts.shared_d_ff or moe.experts.d_ff)
    per_token = (12 * cfg.d_model + moe.router.top_k * (4 * cfg.d_model + 3 * moe.experts.d_ff)
                 + 3 * max(shared, cfg.d_ff if _moe_layers(cfg) < cfg.n_layers else 0) + cfg.vocab_size)
    return tokens * per_token * dtype_bytes


def plan_gpu_memory(cfg: ModelConfig, *, budget_gb: float, dense_params: int, kv_bytes: int,
                    prefill_tokens: int, dtype_bytes: int = 2) -> GpuMemoryPlan:
    """The plan, or a ConfigError naming ``--gpu-mem-gb`` when attention, embeddings, KV cache and
    buffers alone do not fit."""
    per = expert_bytes(cfg, dtype_bytes)
    chunk = max(1, min(MAX_CHUNK, CHUNK_BYTES // per))
    plan = GpuMemoryPlan(int(budget_gb * GiB), dense_params * dtype_bytes, kv_bytes,
                         workspace_bytes(cfg, prefill_tokens, dtype_bytes), 2 * chunk * per, per,
                         _moe_layers(cfg) * cfg.moe.num_experts)
    if plan.fixed > plan.budget:
        need = ", ".join(f"{name} {size(gib * GiB)}" for name, gib in plan.rows()[:4])
        raise ConfigError("--gpu-mem-gb", budget_gb,
                          f"must hold at least {size(plan.fixed)} before any resident expert ({need}); raise it, "
                          "or generate for fewer or shorter prompts or fewer new tokens")
    return plan


def _moe_layers(cfg: ModelConfig) -> int:
    return sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def kv_cache_bytes(cfg: ModelConfig, batch: int, slots: int, dtype_bytes: int = 2) -> int:
    """The KV cache fsmoe.models.kv_cache allocates for ``batch`` rows of ``slots`` tokens."""
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.attention == "mla"
                 else 2 * cfg.kv_heads * cfg.head_size)
    return batch * slots * cfg.n_layers * per_layer * dtype_bytes
