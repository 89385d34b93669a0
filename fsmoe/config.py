"""Run configuration: small nested dataclasses, validated when built.

A run is a TOML preset (``fsmoe/configs/<name>.toml``) plus ``--set a.b.c=value`` overrides.
Every check raises :class:`ConfigError` naming the field, the value and what is allowed, so a
bad run fails before it allocates anything.

Layout::

    RunConfig
      model:    ModelConfig
        moe:    MoEConfig
          router:  RouterConfig
          experts: ExpertsConfig
      parallel: ParallelConfig
      train:    TrainConfig
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config value is out of range; the message names field, value and allowed values."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field_name, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"{field_name}={value!r} is invalid: {allowed}")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(name, value, allowed)


def _one_of(name: str, value: Any, choices) -> None:
    _check(value in choices, name, value, f"allowed values are {sorted(choices)}")


def _positive(name: str, value: Any) -> None:
    _check(isinstance(value, (int, float)) and value > 0, name, value, "must be > 0")


def _at_least(name: str, value: Any, low: int) -> None:
    """An integer (not a bool) >= ``low``."""
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name, value,
           f"must be an integer >= {low}")


def _in_range(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> None:
    """A number in [low, high] (or [low, high) with ``high_open``)."""
    ok = isinstance(value, (int, float)) and low <= value and (value < high if high_open else value <= high)
    _check(ok, name, value, f"must be in [{low}, {high}{')' if high_open else ']'}")


@dataclass
class RouterConfig:
    """How tokens pick experts. Router-specific fields are ignored by other routers."""

    name: str = "gshard"  # see fsmoe.routing.ROUTERS
    top_k: int = 2
    capacity_factor: float | None = None  # None = dropless (default); else tokens over capacity are dropped
    aux_loss_coef: float = 0.01  # GShard/Switch load-balancing loss
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE)
    noise_std: float = 0.0  # GShard noisy top-k: std of Gaussian noise on logits in training
    normalize_weights: bool = True  # renormalise the top-k weights to sum to 1
    # DeepSeek-V3
    bias_update_rate: float = 0.001  # aux-loss-free balancing step gamma
    num_groups: int = 1  # group-limited routing: experts split into groups ...
    topk_groups: int = 1  # ... and each token may use only this many groups
    seq_aux_coef: float = 0.0  # sequence-wise balance loss alpha
    routed_scaling: float = 1.0  # scale applied to routed weights
    # X-MoE
    xmoe_dim: int = 16  # low-rank routing dimension
    xmoe_temperature: float = 0.07
    # SoftMoE
    slots_per_expert: int = 1
    # Expert-choice: capacity per expert = capacity_factor_ec * T * top_k / E
    ec_capacity_factor: float = 1.0
    # Opt in to non-causal routers (SoftMoE, Expert-Choice) inside a causal decoder.
    allow_noncausal: bool = False

    def validate(self, num_experts: int, prefix: str = "router") -> None:
        from fsmoe.routing import ROUTERS  # late import: routers register themselves

        _one_of(f"{prefix}.name", self.name, ROUTERS.keys())
        _check(isinstance(self.top_k, int) and 1 <= self.top_k <= num_experts,
               f"{prefix}.top_k", self.top_k, f"must be an integer in [1, num_experts={num_experts}]")
        if self.capacity_factor is not None:
            _positive(f"{prefix}.capacity_factor", self.capacity_factor)
        for name in ("aux_loss_coef", "z_loss_coef", "noise_std", "seq_aux_coef", "bias_update_rate"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v >= 0, f"{prefix}.{name}", v, "must be >= 0")
        _positive(f"{prefix}.ec_capacity_factor", self.ec_capacity_factor)
        _positive(f"{prefix}.slots_per_expert", self.slots_per_expert)
        _positive(f"{prefix}.xmoe_dim", self.xmoe_dim)
        _positive(f"{prefix}.xmoe_temperature", self.xmoe_temperature)
        _check(isinstance(self.num_groups, int) and self.num_groups >= 1 and num_experts % self.num_groups == 0,
               f"{prefix}.num_groups", self.num_groups, f"must be >= 1 and divide num_experts={num_experts}")
        _check(isinstance(self.topk_groups, int) and 1 <= self.topk_groups <= self.num_groups,
               f"{prefix}.topk_groups", self.topk_groups, f"must be in [1, num_groups={self.num_groups}]")
        ROUTERS[self.name].check_config(self, num_experts, prefix)


DISPATCHERS = ("auto", "local", "alltoall", "hierarchical", "2dh")
MOE_IMPLS = ("fsmoe", "deepspeed")
SWAP_POLICIES = ("hierd", "tokens")


EXPERT_GEMMS = ("auto", "torch", "triton", "cublas")


@dataclass
class ExpertsConfig:
    d_ff: int = 64  # hidden size of one routed expert
    activation: str = "swiglu"  # swiglu | gelu
    num_shared: int = 0  # DeepSeek-style shared experts, always active
    shared_d_ff: int | None = None  # hidden size of one shared expert (default: d_ff)
    # The routed experts' GEMMs on the GPU fast path (moe.kernels resolving to triton, SwiGLU):
    # triton = our grouped GEMMs (fsmoe.kernels.triton_gmm; SwiGLU and the input gradient's two
    # GEMMs fused); torch = torch's grouped_mm; cublas = one cuBLAS GEMM per expert (reads the
    # routing counts on the host: one sync per layer; fsmoe.kernels.expert_loop); auto = whichever
    # measured fastest at the shape on this card (timed once, cached: fsmoe.kernels.gmm_tune).
    gemm: str = "auto"  # auto | torch | triton | cublas

    def validate(self, prefix: str = "experts") -> None:
        _positive(f"{prefix}.d_ff", self.d_ff)
        _one_of(f"{prefix}.activation", self.activation, {"swiglu", "gelu"})
        _one_of(f"{prefix}.gemm", self.gemm, set(EXPERT_GEMMS))
        _check(isinstance(self.num_shared, int) and self.num_shared >= 0, f"{prefix}.num_shared",
               self.num_shared, "must be an integer >= 0")
        if self.shared_d_ff is not None:
            _positive(f"{prefix}.shared_d_ff", self.shared_d_ff)


@dataclass
class MoEConfig:
    num_experts: int = 8
    router: RouterConfig = field(default_factory=RouterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    # auto | local | alltoall | hierarchical (d-level dedup, fsmoe.comm.hierarchical) | 2dh (two
    # levels without dedup: the Tutel-2DH baseline)
    dispatcher: str = "auto"
    dedup_depth: int = 0  # hierarchical dispatcher: levels that dedup (1: across nodes); 0 = per layer by the cost model (flat included)
    dedup_every: int = 10  # ... re-chosen every this many steps (a kept flat choice skips the layout's counting)
    # ... after timing this many dispatches of each path (flat, the model's best d) per layer, each
    # path's predictions get what it measured beyond them added (fsmoe.comm.calibration); 0 = trust the model
    dedup_calibrate: int = 3
    # Kernels chosen when the layer is built: torch = plain PyTorch everywhere; triton = fused
    # Triton kernels (needs Triton + CUDA); auto = triton where it can run, else torch.
    kernels: str = "auto"  # auto | torch | triton
    # Which MoE layer implementation runs: "fsmoe" (ours) or "deepspeed" (DeepSpeed-MoE's
    # deepspeed.moe.layer.MoE around our expert MLP, a peer to measure against; needs the deepspeed
    # package and the distributed trainer: fsmoe/models/peers/deepspeed_moe.py, docs/performance.md)
    impl: str = "fsmoe"

    def validate(self, prefix: str = "moe") -> None:
        _check(isinstance(self.num_experts, int) and self.num_experts >= 1, f"{prefix}.num_experts",
               self.num_experts, "must be an integer >= 1")
        _one_of(f"{prefix}.dispatcher", self.dispatcher, set(DISPATCHERS))
        _check(isinstance(self.dedup_depth, int) and not isinstance(self.dedup_depth, bool)
               and 0 <= self.dedup_depth <= 4, f"{prefix}.dedup_depth", self.dedup_depth,
               "must be an integer in [0, 4] (0 = chosen per layer by the cost model, flat included; "
               "d >= 1: dedup across the outermost d levels)")
        _at_least(f"{prefix}.dedup_every", self.dedup_every, 1)
        _at_least(f"{prefix}.dedup_calibrate", self.dedup_calibrate, 0)
        _one_of(f"{prefix}.kernels", self.kernels, {"auto", "torch", "triton"})
        _one_of(f"{prefix}.impl", self.impl, set(MOE_IMPLS))
        self.router.validate(self.num_experts, f"{prefix}.router")
        self.experts.validate(f"{prefix}.experts")


@dataclass
class RopeScalingConfig:
    """Long-context RoPE scaling. ``kind='yarn'`` (YaRN, Peng et al. 2023; DeepSeek-V3 and
    Qwen3 long-context checkpoints): frequencies between ``beta_slow`` and ``beta_fast`` rotations
    over ``original_max_seq_len`` are blended from interpolated (/ ``factor``) to original; cos/sin
    are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim), and MLA's softmax scale
    by mscale(factor, mscale_all_dim)^2, with mscale(s, m) = 0.1 m ln s + 1 (as Hugging Face does)."""

    kind: str = "none"  # none | yarn
    factor: float = 1.0
    original_max_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True  # round the blended range of dims outward to whole dims

    def validate(self, prefix: str = "rope_scaling") -> None:
        _one_of(f"{prefix}.kind", self.kind, {"none", "yarn"})
        for name in ("factor", "original_max_seq_len", "beta_fast", "beta_slow"):
            _positive(f"{prefix}.{name}", getattr(self, name))
        for name in ("mscale", "mscale_all_dim"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and v >= 0, f"{prefix}.{name}", v, "must be >= 0")


@dataclass
class ModelConfig:
    """A decoder. ``arch='gpt'``: LayerNorm, learned positions, GeLU (GPT2-XL-MoE).
    ``arch='llama'``: RMSNorm, RoPE, SwiGLU (Mixtral, Qwen3, DeepSeek)."""

    arch: str = "gpt"  # gpt | llama
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int = 256  # hidden size of the dense FFN layers
    max_seq_len: int = 128
    moe_every: int = 1  # every N-th layer is MoE (GPT2-XL-MoE uses 2) ...
    first_dense: int = 0  # ... after this many leading dense layers (DeepSeek-V3 uses 3)
    tie_embeddings: bool = False
    qk_norm: bool = False  # Qwen3
    attention: str = "mha"  # mha | mla (DeepSeek multi-head latent attention)
    # MLA sizes (DeepSeek-V3)
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    latent_norm_eps: float | None = None  # eps of MLA's q/kv latent norms; None = norm_eps (HF DeepSeek-V3: 1e-6)
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02  # std of the normal init; residual projections use init_std / sqrt(2 * n_layers)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self, prefix: str = "model") -> None:
        _one_of(f"{prefix}.arch", self.arch, {"gpt", "llama"})
        _one_of(f"{prefix}.attention", self.attention, {"mha", "mla"})
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "moe_every"):
            _positive(f"{prefix}.{name}", getattr(self, name))
        _check(self.first_dense >= 0, f"{prefix}.first_dense", self.first_dense, "must be >= 0")
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0, f"{prefix}.n_heads", self.n_heads,
                   f"must divide d_model={self.d_model} (or set head_dim)")
        kv = self.n_kv_heads or self.n_heads
        _check(self.n_heads % kv == 0, f"{prefix}.n_kv_heads", kv, f"must divide n_heads={self.n_heads}")
        _check(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")
        self._validate_attention(prefix)
        for name in ("rope_theta", "norm_eps", "init_std"):
            _positive(f"{prefix}.{name}", getattr(self, name))
        if self.latent_norm_eps is not None:
            _positive(f"{prefix}.latent_norm_eps", self.latent_norm_eps)
        self.rope_scaling.validate(f"{prefix}.rope_scaling")
        self.moe.validate(f"{prefix}.moe")
        r = self.moe.router
        from fsmoe.routing import ROUTERS

        if not ROUTERS[r.name].causal and not r.allow_noncausal:
            raise ConfigError(f"{prefix}.moe.router.name", r.name,
                              "this router mixes tokens across the sequence (not causal), so a decoder "
                              "trained with it leaks future tokens; use a token-choice router "
                              f"({', '.join(sorted(n for n, c in ROUTERS.items() if c.causal))}) or set "
                              f"{prefix}.moe.router.allow_noncausal=true to opt in")

    def _validate_attention(self, prefix: str) -> None:
        """Head sizes, GQA and MLA shapes; RoPE rotates pairs, so rotated dims must be even."""
        if self.n_kv_heads is not None:
            _check(isinstance(self.n_kv_heads, int) and self.n_kv_heads >= 1, f"{prefix}.n_kv_heads",
                   self.n_kv_heads, "must be an integer >= 1 (or unset = n_heads)")
        if self.head_dim is not None:
            _positive(f"{prefix}.head_dim", self.head_dim)
        if self.attention == "mla":
            _check(self.arch == "llama", f"{prefix}.attention", self.attention,
                   "mla needs arch='llama' (it uses RoPE and RMSNorm)")
            _check(not self.qk_norm, f"{prefix}.qk_norm", self.qk_norm,
                   "must be false with attention='mla' (MLA normalises its latents instead)")
            _check(isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 0, f"{prefix}.q_lora_rank",
                   self.q_lora_rank, "must be an integer >= 0 (0 = no query compression)")
            for name in ("kv_lora_rank", "v_head_dim"):
                _positive(f"{prefix}.{name}", getattr(self, name))
            _check(isinstance(self.qk_nope_head_dim, int) and self.qk_nope_head_dim >= 0,
                   f"{prefix}.qk_nope_head_dim", self.qk_nope_head_dim, "must be an integer >= 0")
            _check(isinstance(self.qk_rope_head_dim, int) and self.qk_rope_head_dim > 0
                   and self.qk_rope_head_dim % 2 == 0, f"{prefix}.qk_rope_head_dim", self.qk_rope_head_dim,
                   "must be a positive even integer")
        elif self.arch == "llama":
            _check(self.head_size % 2 == 0, f"{prefix}.head_dim", self.head_size,
                   "must be even: RoPE rotates pairs of dimensions")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense and (i - self.first_dense) % self.moe_every == self.moe_every - 1


MAX_TIMEOUT_S = 7 * 86400.0  # a week: larger values overflow the collectives' timedelta
# parallel.schedule: the policy names of fsmoe/schedule/baselines.py (POLICY_NAMES), "default" first.
SCHEDULES = ("default", "tutel_improved", "pipemoe_lina", "fsmoe_no_iio", "fsmoe")


@dataclass
class ParallelConfig:
    """``world = dp * mp = edp * ep * esp``. ESP shards each expert along d_ff inside a node;
    edp (expert data parallel) replicates the experts when ep*esp < world (see fsmoe.parallel.groups)."""

    dp: int = 1
    mp: int = 1
    ep: int = 1
    esp: int = 1
    gpus_per_node: int | None = None  # simulated node size for topology-aware paths; None = real nodes
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 120.0  # collective timeout: a stuck rank fails instead of hanging
    # The MoE schedule `fsmoe train` runs (fsmoe.schedule, docs/scheduler.md): "default" is the plain
    # dispatcher and one gradient sync; any other name is a policy of fsmoe/schedule/baselines.py,
    # planned at start-up and run by the pipelined executor + partitioned gradient AllReduce.
    schedule: str = "default"
    profile: str | None = None  # Profile JSON (`fsmoe profile`); None: a quick profile at start-up
    pipeline_degree: int = 0  # 0: the planner's r; k >= 1 forces r_fwd = r_bwd = k
    # Steps of each path in the check that times the plan's executors against the default path on
    # alternate steps and keeps the faster (GPUs, FSMoE's policies, planned r > 1); 0 = trust the plan.
    schedule_check_steps: int = 4
    # Levels of the machine, outermost first, e.g. [nodes, sockets_per_node, gpus_per_socket]; the
    # product is the world size. None: nodes of gpus_per_node (or torchrun's local size) ranks.
    topology: list[int] | None = None
    expert_swap_every: int = 0  # swap one pair of experts every this many steps (0 = never)
    swap_policy: str = "hierd"  # hierd: by the predicted dispatch time | tokens: by raw token counts
    swap_gamma: float = 10.0  # smooth-max sharpness of the swap objective
    # Expert placement (fsmoe.placement, docs/placement.md): "static" keeps expert p*E/ep + j on EP
    # rank p; "flexmoe" / "eplb" replicate, shrink and move experts every placement_interval steps
    # by the measured routing traffic, into placement_extra_slots * E/ep spare slots per rank.
    placement: str = "static"
    placement_interval: int = 50  # steps between rebalances (and the traffic window)
    placement_threshold: float = 1.05  # flexmoe: rebalance when max/mean rank load exceeds this
    placement_extra_slots: float = 0.125  # spare slots per rank, as a fraction of E/ep (rounded up)
    placement_max_moved: float = 0.1  # flexmoe: at most this fraction of the experts moves per rebalance
    placement_ema: float = 1.0  # weight of the newest window in the predicted load (1: that window alone)
    placement_overlap: bool = True  # move experts behind the next step's compute (False: the step waits)
    # What is split over the data-parallel replicas (fsmoe.parallel.zero, docs/memory.md): "none" keeps
    # AdamW's moments for every parameter on every rank; "optimizer" (ZeRO-1/2) splits them, the
    # fp32 weight slices they update and the gradients (reduce-scattered) over each parameter's
    # replica group (dp; edp for routed experts); "full" (ZeRO-3) splits the blocks' weights too,
    # gathered for each block's forward and backward and freed after (fsmoe.parallel.zero3).
    shard: str = "none"

    @property
    def world(self) -> int:
        return self.dp * self.mp

    def validate(self, num_experts: int, prefix: str = "parallel") -> None:
        for name in ("dp", "mp", "ep", "esp"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"{prefix}.{name}", v, "must be an integer >= 1")
        _check((self.dp * self.mp) % (self.ep * self.esp) == 0, f"{prefix}.ep*esp", self.ep * self.esp,
               f"must divide dp*mp={self.dp * self.mp} (the MoE part runs on the same ranks; "
               "dp*mp/(ep*esp) is the expert-data-parallel degree)")
        _check(num_experts % self.ep == 0, f"{prefix}.ep", self.ep,
               f"EP={self.ep} does not divide num_experts={num_experts}")
        _one_of(f"{prefix}.backend", self.backend, {"auto", "gloo", "nccl"})
        if self.gpus_per_node is not None:
            _check(self.gpus_per_node >= 1 and self.world % self.gpus_per_node == 0,
                   f"{prefix}.gpus_per_node", self.gpus_per_node, f"must divide world size {self.world}")
        _check(0 < self.timeout_s <= MAX_TIMEOUT_S, f"{prefix}.timeout_s", self.timeout_s,
               f"must be in (0, {MAX_TIMEOUT_S:g}] seconds")
        _check(self.schedule in SCHEDULES, f"{prefix}.schedule", self.schedule,
               f"allowed values are {list(SCHEDULES)}")
        _check(self.profile is None or (isinstance(self.profile, str) and self.profile != ""),
               f"{prefix}.profile", self.profile, "must be a path to a Profile JSON (fsmoe profile) or unset")
        _check(isinstance(self.pipeline_degree, int) and self.pipeline_degree >= 0, f"{prefix}.pipeline_degree",
               self.pipeline_degree, "must be an integer >= 0 (0 = the planner's r)")
        _check(isinstance(self.schedule_check_steps, int) and not isinstance(self.schedule_check_steps, bool)
               and self.schedule_check_steps >= 0, f"{prefix}.schedule_check_steps", self.schedule_check_steps,
               "must be an integer >= 0 (0 = no check: run the plan as planned)")
        self._validate_hierarchy(prefix)
        self._validate_placement(num_experts, prefix)
        self._validate_shard(prefix)
        if self.schedule == "default":
            _check(self.pipeline_degree == 0, f"{prefix}.pipeline_degree", self.pipeline_degree,
                   f"needs a pipelined {prefix}.schedule (one of {list(SCHEDULES[1:])}); 'default' runs r = 1")

    def _validate_hierarchy(self, prefix: str) -> None:
        """Topology, dedup depth and expert swaps (fsmoe.comm.hierarchical, fsmoe.placement.swap)."""
        if self.topology is not None:
            _check(isinstance(self.topology, list) and 1 <= len(self.topology) <= 4
                   and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.topology),
                   f"{prefix}.topology", self.topology,
                   "must be a list of 1 to 4 integers >= 1, outermost first, e.g. [nodes, sockets_per_node, "
                   "gpus_per_socket]")
            if self.gpus_per_node is not None:
                inner = math.prod(self.topology[1:])
                _check(self.gpus_per_node == inner, f"{prefix}.gpus_per_node", self.gpus_per_node,
                       f"must equal the product of {prefix}.topology's inner levels ({inner}) or be unset")
        _at_least(f"{prefix}.expert_swap_every", self.expert_swap_every, 0)
        _one_of(f"{prefix}.swap_policy", self.swap_policy, set(SWAP_POLICIES))
        _positive(f"{prefix}.swap_gamma", self.swap_gamma)

    def _validate_placement(self, num_experts: int, prefix: str) -> None:
        _one_of(f"{prefix}.placement", self.placement, PLACEMENTS)
        _at_least(f"{prefix}.placement_interval", self.placement_interval, 1)
        _in_range(f"{prefix}.placement_threshold", self.placement_threshold, 1.0, 100.0)
        _check(isinstance(self.placement_extra_slots, (int, float)) and 0 < self.placement_extra_slots <= 1,
               f"{prefix}.placement_extra_slots", self.placement_extra_slots,
               "must be in (0, 1] (spare slots per rank as a fraction of num_experts / ep)")
        _check(isinstance(self.placement_max_moved, (int, float)) and 0 < self.placement_max_moved <= 1,
               f"{prefix}.placement_max_moved", self.placement_max_moved, "must be in (0, 1]")
        _check(isinstance(self.placement_ema, (int, float)) and 0 < self.placement_ema <= 1,
               f"{prefix}.placement_ema", self.placement_ema, "must be in (0, 1]")
        _check(isinstance(self.placement_overlap, bool), f"{prefix}.placement_overlap", self.placement_overlap,
               "must be true or false")
        if self.placement != "static":
            _check(self.ep >= 2, f"{prefix}.placement", self.placement,
                   f"moves experts between EP ranks, so it needs {prefix}.ep >= 2 (got ep={self.ep}); use 'static'")
            _check(self.schedule == "default", f"{prefix}.placement", self.placement,
                   f"runs with {prefix}.schedule='default' only (the pipelined schedule plans for fixed "
                   "expert shards); use 'static' or the default schedule")

    def _validate_shard(self, prefix: str) -> None:
        _one_of(f"{prefix}.shard", self.shard, set(SHARD_MODES))
        if self.shard == "none":
            return
        _check(self.placement == "static", f"{prefix}.shard", self.shard,
               f"moving experts ({prefix}.placement={self.placement!r}) needs their whole optimizer state "
               f"on each rank; use {prefix}.shard='none' or {prefix}.placement='static'")
        _check(self.expert_swap_every == 0, f"{prefix}.shard", self.shard,
               f"expert swaps ({prefix}.expert_swap_every={self.expert_swap_every}) need the whole optimizer "
               f"state on each rank; use {prefix}.shard='none' or {prefix}.expert_swap_every=0")



PLACEMENTS = ("static", "flexmoe", "eplb")
SHARD_MODES = ("none", "optimizer", "full")


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # sequences per step (global)
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # AdamW's denominator term
    grad_clip: float = 1.0  # 0 = off
    seed: int = 0
    log_every: int = 5
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_every: int = 100  # 0 = only at the end
    data: list[str] | None = None  # text files / directories; None = this Python's own stdlib .py sources
    data_limit_mb: float = 8.0  # read at most this much text
    val_fraction: float = 0.05
    dtype: str = "float32"  # float32 | bfloat16 (CUDA: bf16 compute, fp32 weights and optimizer state)
    device: str = "auto"  # auto | cpu | cuda
    timeline_steps: int = 0  # record this many steps' op timeline (needs a pipelined parallel.schedule)
    activation_checkpointing: str = "none"  # none | moe (recompute the experts' MLP) | full (every block)
    compile: bool = False  # torch.compile the dense parts of each block (attention, norms, dense FFN); CUDA only
    on_nonfinite: str = "stop"  # a non-finite loss or grad norm: stop (error) | skip (the step, counted)
    trace: bool = False  # write every step's source-rank x expert routing counts (routing_trace.jsonl.gz)
    torch_profile_steps: int = 0  # profile this many steps with torch.profiler (fsmoe.profiling); 0 = off
    # Replay the whole step (forward, backward, clipping, AdamW) as one CUDA graph after a few eager
    # steps: no per-kernel launch cost (fsmoe.graph_step). One process on CUDA; see RunConfig.validate.
    cuda_graph: bool = False
    # torch threads of a training process on the CPU; 0: automatic (fsmoe.cpu_threads: half the
    # logical CPUs from eight on, where a thread on each stalled steps; OMP_NUM_THREADS when set)
    cpu_threads: int = 0

    def validate(self, max_seq_len: int, prefix: str = "train") -> None:
        for name in ("steps", "batch_size", "seq_len", "lr", "log_every", "eval_every", "eval_batches",
                     "data_limit_mb"):
            _positive(f"{prefix}.{name}", getattr(self, name))
        _check(self.seq_len <= max_seq_len, f"{prefix}.seq_len", self.seq_len,
               f"must be <= model.max_seq_len={max_seq_len}")
        _at_least(f"{prefix}.ckpt_every", self.ckpt_every, 0)
        _at_least(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        _check(0 <= self.seed < 2**63, f"{prefix}.seed", self.seed, "must be an integer in [0, 2**63)")
        _check(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):  # AdamW's moment decay rates
            _in_range(f"{prefix}.{name}", getattr(self, name), 0.0, 1.0, high_open=True)
        _in_range(f"{prefix}.eps", self.eps, 1e-30, 1.0)
        _check(0 < self.val_fraction < 1, f"{prefix}.val_fraction", self.val_fraction, "must be in (0, 1)")
        _in_range(f"{prefix}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check(self.data is None or (len(self.data) > 0 and all(p.strip() for p in self.data)), f"{prefix}.data",
               self.data, "must be a non-empty list of paths (or unset for the stdlib default)")
        _one_of(f"{prefix}.dtype", self.dtype, {"float32", "bfloat16"})
        _one_of(f"{prefix}.device", self.device, {"auto", "cpu", "cuda"})
        _one_of(f"{prefix}.activation_checkpointing", self.activation_checkpointing, {"none", "moe", "full"})
        _check(isinstance(self.compile, bool), f"{prefix}.compile", self.compile, "must be true or false")
        _one_of(f"{prefix}.on_nonfinite", self.on_nonfinite, {"stop", "skip"})
        _check(isinstance(self.trace, bool), f"{prefix}.trace", self.trace, "must be true or false")
        _check(isinstance(self.cuda_graph, bool), f"{prefix}.cuda_graph", self.cuda_graph, "must be true or false")
        _check(isinstance(self.cpu_threads, int) and not isinstance(self.cpu_threads, bool) and self.cpu_threads >= 0,
               f"{prefix}.cpu_threads", self.cpu_threads, "must be a whole number >= 0 (0: automatic)")
        if self.torch_profile_steps:
            from fsmoe.profiling import WAIT_STEPS, WARMUP_STEPS

            least = WAIT_STEPS + WARMUP_STEPS + self.torch_profile_steps
            _check(self.steps >= least, f"{prefix}.torch_profile_steps", self.torch_profile_steps,
                   f"records after {WAIT_STEPS + WARMUP_STEPS} warm-up steps, so it needs {prefix}.steps >= {least} "
                   f"(got {self.steps})")
        for name in ("timeline_steps", "torch_profile_steps"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{prefix}.{name}", value,
                   "must be an integer >= 0 (0 = off)")


_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class RunConfig:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check(isinstance(self.name, str) and _NAME.fullmatch(self.name) is not None and self.name not in (".", ".."),
               "name", self.name, "must be a non-empty name of letters, digits, '.', '_' or '-' (it names "
               "runs/<name>)")
        self.model.validate()
        self.parallel.validate(self.model.moe.num_experts)
        self.train.validate(self.model.max_seq_len)
        if self.train.activation_checkpointing != "none" and self.parallel.schedule != "default":
            raise ConfigError("train.activation_checkpointing", self.train.activation_checkpointing,
                              "runs with parallel.schedule='default' only (the pipelined executor times "
                              "and overlaps each op once per step); use 'none' or the default schedule")
        _check(not (self.train.compile and self.parallel.shard == "full"), "train.compile", self.train.compile,
               "is not yet checked with weights freed between uses (parallel.shard='full'): the compiled blocks "
               "may keep reading a released weight's old address; use one or the other")
        _check(self.train.batch_size % (self.parallel.dp * self.parallel.mp) == 0, "train.batch_size",
               self.train.batch_size, f"must be divisible by parallel.dp={self.parallel.dp} (each data-parallel rank "
               f"takes an equal share) times parallel.mp={self.parallel.mp} (the MoE layers split that share over "
               "the tensor-parallel ranks)")
        self._validate_layout()
        if self.train.cuda_graph:
            self._validate_cuda_graph()
        if self.model.moe.impl != "fsmoe":
            self._validate_peer()
        if self.train.timeline_steps and self.parallel.schedule == "default":
            raise ConfigError("train.timeline_steps", self.train.timeline_steps,
                              f"records the pipelined executor's ops; set parallel.schedule to one of "
                              f"{list(SCHEDULES[1:])}")

    def _validate_cuda_graph(self) -> None:
        """What a captured step cannot hold yet, each named: collectives between processes, the
        pipelined schedule's host-side timing, a per-step host update of router state, the routing
        trace's per-step host read, torch.compile's own graphs."""
        why = None
        if self.parallel.world > 1:
            why = f"runs in one process for now (parallel.dp * parallel.mp = {self.parallel.world})"
        elif self.parallel.schedule != "default":
            why = "needs parallel.schedule='default' (the pipelined schedule times its ops on the host)"
        elif self.train.device == "cpu":
            why = "needs a CUDA device (train.device='cpu')"
        elif self.train.trace:
            why = "cannot record train.trace (it reads every step's routing on the host)"
        elif self.train.compile:
            why = "and train.compile are not combined yet; use one or the other"
        elif self.train.activation_checkpointing != "none":
            why = "is not yet checked with train.activation_checkpointing (recomputation inside a captured step)"
        elif self.model.moe.impl != "fsmoe":
            why = f"runs fsmoe's MoE layer only (model.moe.impl={self.model.moe.impl!r})"
        elif self.model.moe.router.name == "deepseek":
            why = "cannot yet replay the deepseek router's per-step expert-bias update (model.moe.router.name)"
        elif self.model.moe.experts.gemm == "cublas":
            why = ("cannot capture model.moe.experts.gemm='cublas' (it reads the routing counts on the host); "
                   "use 'auto', 'torch' or 'triton'")
        if why:
            raise ConfigError("train.cuda_graph", True, why)

    def _validate_layout(self) -> None:
        """What fsmoe.parallel would refuse when it shards the model, checked up front: ESP splits
        d_ff, MP splits attention heads (MLA stays replicated) and the dense MLPs, and the
        dispatcher must fit the layout."""
        m, p = self.model, self.parallel
        _check(m.moe.experts.d_ff % p.esp == 0, "parallel.esp", p.esp,
               f"ESP={p.esp} does not divide model.moe.experts.d_ff={m.moe.experts.d_ff}")
        if m.attention == "mha":
            _check(m.n_heads % p.mp == 0 and m.kv_heads % p.mp == 0, "parallel.mp", p.mp,
                   f"must divide model.n_heads={m.n_heads} and n_kv_heads={m.kv_heads}")
        if m.first_dense > 0 or m.moe_every > 1:  # some layer is dense (see is_moe_layer)
            _check(m.d_ff % p.mp == 0, "parallel.mp", p.mp, f"must divide model.d_ff={m.d_ff}")
        if m.moe.dispatcher in ("hierarchical", "2dh"):
            _check(p.schedule == "default", "model.moe.dispatcher", m.moe.dispatcher,
                   "runs with parallel.schedule='default' (the pipelined executor cuts flat layouts into "
                   "chunks); use 'alltoall' for a pipelined schedule")
            from fsmoe.routing import ROUTERS

            _check(ROUTERS[m.moe.router.name].order == "index", "model.moe.dispatcher", m.moe.dispatcher,
                   f"needs a router that assigns tokens to experts (not {m.moe.router.name!r}, which mixes "
                   "tokens into slots)")
        if p.expert_swap_every:
            _check(m.moe.dispatcher == "hierarchical", "parallel.expert_swap_every", p.expert_swap_every,
                   f"swaps experts under model.moe.dispatcher='hierarchical' (it scores the routing that "
                   f"dispatcher records), not {m.moe.dispatcher!r}")
        if p.placement != "static":  # replicas and spare slots live in the flat dispatch layout
            _check(m.moe.dispatcher in ("auto", "alltoall"), "parallel.placement", p.placement,
                   f"moves and replicates experts under model.moe.dispatcher='alltoall' or 'auto', not "
                   f"{m.moe.dispatcher!r}; use parallel.placement='static' there")
        _check(m.moe.dispatcher != "local" or p.ep * p.esp == 1, "model.moe.dispatcher", m.moe.dispatcher,
               f"needs ep*esp == 1 (got ep={p.ep}, esp={p.esp}); use 'auto' or 'alltoall'")

    def _validate_peer(self) -> None:
        """``model.moe.impl='deepspeed'``: what DeepSpeed-MoE's layer can stand in for, checked up
        front (fsmoe.models.peers.deepspeed_moe): the package is importable, plain EP (x EDP) with
        the default schedule and static placement, and a GShard softmax top-k router without the
        extras DeepSpeed's gate does not have."""
        import importlib.util

        m, p, name = self.model.moe, self.parallel, "model.moe.impl"
        _check(importlib.util.find_spec("deepspeed") is not None, name, m.impl,
               "needs the deepspeed package, which is not installed here (pure Python is enough: "
               "`DS_BUILD_OPS=0 pip install deepspeed`); use 'fsmoe'")
        for field_name, value, ok in (
                ("parallel.mp", p.mp, p.mp == 1), ("parallel.esp", p.esp, p.esp == 1),
                ("parallel.schedule", p.schedule, p.schedule == "default"),
                ("parallel.placement", p.placement, p.placement == "static"),
                ("parallel.expert_swap_every", p.expert_swap_every, p.expert_swap_every == 0),
                ("model.moe.dispatcher", m.dispatcher, m.dispatcher in ("auto", "alltoall")),
                ("model.moe.router.name", m.router.name, m.router.name == "gshard"),
                ("model.moe.router.z_loss_coef", m.router.z_loss_coef, m.router.z_loss_coef == 0),
                ("model.moe.router.noise_std", m.router.noise_std, m.router.noise_std == 0),
                ("model.moe.router.normalize_weights", m.router.normalize_weights, m.router.normalize_weights),
                ("model.moe.experts.num_shared", m.experts.num_shared, m.experts.num_shared == 0),
                ("train.activation_checkpointing", self.train.activation_checkpointing,
                 self.train.activation_checkpointing != "moe")):
            _check(ok, field_name, value, f"is not supported with {name}='{m.impl}' (DeepSpeed-MoE's layer: "
                   "EP x EDP only, default schedule, static placement, GShard softmax top-k gate with "
                   "renormalised weights, no z-loss/noise/shared experts/expert-only recompute); use "
                   f"{name}='fsmoe' or the default value")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building from dicts / TOML


def _build(cls, data: dict, prefix: str):
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses; unknown keys fail."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{prefix}{key}", value, f"unknown field{hint}; known fields: {sorted(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            _check(isinstance(value, dict), f"{prefix}{key}", value, "must be a table")
            value = _build(hint, value, f"{prefix}{key}.")
        else:
            value = _coerce(value, hint, f"{prefix}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(value: Any, hint, name: str):
    """Check a leaf value's type (ints are accepted where floats are expected, floats must be
    finite; ``list[str]`` fields take a list)."""
    args = typing.get_args(hint)
    allowed = [a for a in args if a is not type(None)] if typing.get_origin(hint) is not list else [hint]
    allowed = allowed or [hint]
    if value is None and hint is str:  # a bare `none` in --set is the word, for fields like activation_checkpointing
        return "none"
    if value is None:
        _check(type(None) in args, name, value, "must not be empty")
        return None
    for t in allowed:
        if typing.get_origin(t) is list and isinstance(value, (list, str)):
            (item,) = typing.get_args(t)  # a lone string is a one-item list (one path)
            return [_coerce(v, item, name) for v in ([value] if isinstance(value, str) else value)]
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            _check(math.isfinite(value), name, value, "must be a finite number")
            return float(value)
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is str and isinstance(value, str):
            return value
    raise ConfigError(name, value, f"must be of type {' or '.join(_type_name(t) for t in allowed)}")


def _type_name(t) -> str:
    return f"list of {typing.get_args(t)[0].__name__}" if typing.get_origin(t) is list else t.__name__


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'model.moe.num_experts=16'`` -> (['model','moe','num_experts'], 16). Values are TOML."""
    if "=" not in text:
        raise ConfigError("--set", text, "expected KEY=VALUE, e.g. model.moe.num_experts=16")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: router.name=sigmoid
    if raw.strip().lower() in ("none", "null"):
        value = None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), ".".join(path), value, f"'{part}' is not a table")
        node[path[-1]] = value
    return data


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(preset_or_path: str = "tiny", overrides: list[str] | None = None) -> RunConfig:
    """Load a preset name or a TOML path, apply ``--set`` overrides, validate."""
    return config_from_dict(raw_config(preset_or_path, overrides))


def raw_config(preset_or_path: str = "tiny", overrides: list[str] | None = None) -> dict:
    """The dict of a preset name or a TOML path with ``--set`` overrides applied (not yet validated)."""
    path = Path(preset_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{preset_or_path}.toml"
        _check(path.exists(), "preset", preset_or_path, f"known presets are {list_presets()} (or a .toml path)")
    _check(path.exists(), "config", str(path), "file does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("config", str(path), f"is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError("config", str(path), f"cannot be read ({e.strerror})") from None
    data.setdefault("name", path.stem)
    return apply_overrides(data, overrides or [])


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data, "")


def model_config_from_dict(data: dict) -> ModelConfig:
    """The ``model`` section alone (not validated against a layout or training config)."""
    _check(isinstance(data, dict), "model", data, "must be a table")
    return _build(ModelConfig, data, "model.")
