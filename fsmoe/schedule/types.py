"""The scheduler's contracts: what the planner plans for, what it decides, what the engines record.

    LayerSpec      one MoE transformer block (shapes, k, E, activation, dtypes)
    Layout         the process grid (fsmoe.parallel.layout, re-exported): the cost model reads its
                   first ep x esp moe group, node size and the dense data-parallel degree dp
    GarPlan        where the dense gradients' AllReduce partitions go
    LayerSchedule  what one layer's executor runs: r forward / backward, intra/inter overlap
    Schedule       a whole plan: the above plus its predictions (``plan`` returns it)
    Lanes          lane names the program queues ops on
    Op, OpRecord   one scheduled op, and its start/end on one lane of one rank

Everything here is a frozen dataclass with no dependencies beyond the standard library and the
pure ``fsmoe.parallel.layout``, so the pure models (``schedule.model``) and the runtime
(``schedule.run``) meet here and nowhere else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from fsmoe.parallel.layout import Layout  # noqa: F401  (re-exported)

COMPUTE_LANE = "compute"
HOST = "host"  # lane of the block spans (kind "block"): recorded to derive the glue, not drawn in the Gantt


@dataclass(frozen=True)
class LayerSpec:
    """One MoE transformer block as FSMoE's grid describes it (per data-parallel rank).

    batch B sequences of seq_len L tokens per rank, model dim M = d_model, expert hidden H = d_ff
    (whole expert, before ESP sharding), top_k k of num_experts E, capacity_factor f (None =
    dropless), activation 'gelu' (simple FFN, 2 GEMMs) or 'swiglu' (Mixtral FFN, 3 GEMMs);
    n_layers identical blocks (gradient partitioning spans them); dtype_bytes of activations,
    grad_bytes of the dense gradients the Gradient-AllReduce moves (4 when fp32 parameters train
    under bf16 autocast, as ``fsmoe train`` does).
    """

    batch: int
    seq_len: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 2
    n_heads: int = 8
    capacity_factor: float | None = None
    activation: str = "gelu"
    n_layers: int = 1
    dtype_bytes: int = 4
    grad_bytes: int = 4

    def __post_init__(self):
        for name in ("batch", "seq_len", "d_model", "d_ff", "num_experts", "top_k", "n_heads", "n_layers",
                     "dtype_bytes", "grad_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LayerSpec.{name}={v!r} is invalid: must be an integer >= 1")
        if self.activation not in ("gelu", "swiglu"):
            raise ValueError(f"LayerSpec.activation={self.activation!r} is invalid: allowed gelu, swiglu")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"LayerSpec.capacity_factor={self.capacity_factor!r} is invalid: must be > 0")
        if self.d_model % self.n_heads:
            raise ValueError(f"LayerSpec.n_heads={self.n_heads} must divide d_model={self.d_model}")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def gemms(self) -> int:
        return 3 if self.activation == "swiglu" else 2

    @property
    def routed_rows(self) -> int:
        """Rows one rank sends per layer with balanced routing (capacity caps them)."""
        frac = 1.0 if self.capacity_factor is None else min(1.0, self.capacity_factor)
        return int(round(self.top_k * self.tokens * frac))

    @property
    def gar_bytes(self) -> int:
        """Bytes of one block's dense gradients (what the Gradient-AllReduce reduces)."""
        return self.dense_params * self.grad_bytes

    @property
    def dense_params(self) -> int:
        """Parameters of the block that are data-parallel: attention (QKV, O with biases),
        the router, two LayerNorms. Their gradients are what the Gradient-AllReduce reduces."""
        M = self.d_model
        return 4 * M * M + 4 * M + M * self.num_experts + 4 * M

    @property
    def dense_tag(self) -> str:
        """Shape of the attention block, for its shape-specific fits (``dense_fwd@<tag>``)."""
        return f"b{self.batch}l{self.seq_len}m{self.d_model}h{self.n_heads}B{self.dtype_bytes}"

    @property
    def glue_tag(self) -> str:
        """Shape of a block's unscheduled host work (router, Order, norms): ``glue_fwd@<tag>``."""
        return f"b{self.batch}l{self.seq_len}m{self.d_model}e{self.num_experts}k{self.top_k}B{self.dtype_bytes}"

    @property
    def dense_macs(self) -> int:
        """Multiply-adds of the attention block forward: projections + scores + weighted sum."""
        return 4 * self.tokens * self.d_model ** 2 + 2 * self.batch * self.seq_len ** 2 * self.d_model

    @staticmethod
    def from_run_config(cfg, batch: int | None = None, seq_len: int | None = None) -> "LayerSpec":
        """From a ``fsmoe.config.RunConfig``: per-rank batch = global batch / dp."""
        m, moe, tr = cfg.model, cfg.model.moe, cfg.train
        b = batch if batch is not None else max(1, tr.batch_size // cfg.parallel.dp)
        n_moe = sum(m.is_moe_layer(i) for i in range(m.n_layers))
        return LayerSpec(batch=b, seq_len=seq_len or tr.seq_len, d_model=m.d_model, d_ff=moe.experts.d_ff,
                         num_experts=moe.num_experts, top_k=moe.router.top_k, n_heads=m.n_heads,
                         capacity_factor=moe.router.capacity_factor, activation=moe.experts.activation,
                         n_layers=max(1, n_moe), dtype_bytes=2 if tr.dtype == "bfloat16" else 4,
                         grad_bytes=4)  # parameters stay fp32 (bf16 is autocast only)


GAR_MODES = ("end", "ready", "chunks", "windows")


@dataclass(frozen=True)
class GarPlan:
    mode: str = "end"
    window_bytes: tuple[int, ...] = ()  # windows: bytes placed in MoE layer l's backward (index = layer id)
    chunk_bytes: int = 0  # chunks: fixed chunk size

    def __post_init__(self):
        if self.mode not in GAR_MODES:
            raise ValueError(f"GarPlan.mode={self.mode!r} is invalid: allowed {list(GAR_MODES)}")
        if self.mode == "chunks" and self.chunk_bytes <= 0:
            raise ValueError(f"GarPlan.chunk_bytes={self.chunk_bytes} must be > 0 for mode 'chunks'")
        if any(b < 0 for b in self.window_bytes):
            raise ValueError(f"GarPlan.window_bytes={self.window_bytes} must be >= 0")


@dataclass(frozen=True)
class Lanes:
    """Lane names. Without intra/inter overlap (IIO) AG/RS share the inter lane with the A2As."""

    inter: str = "inter"
    intra: str = "intra"

    @staticmethod
    def of(iio: bool) -> "Lanes":
        return Lanes("inter", "intra" if iio else "inter")


@dataclass(frozen=True)
class LayerSchedule:
    """What the executor needs from a Schedule: degrees and whether AG/RS get their own lane."""

    r_fwd: int = 1
    r_bwd: int = 1
    iio: bool = True

    def __post_init__(self):
        for name in ("r_fwd", "r_bwd"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LayerSchedule.{name}={v!r} is invalid: must be an integer >= 1")


@dataclass(frozen=True)
class Schedule:
    """What the executor runs, and what the models predicted for it."""

    policy: str
    r_fwd: int
    r_bwd: int
    iio: bool
    gar: GarPlan = GarPlan()
    case_fwd: int = 0  # FSMoE case (1-4) that bounds the forward / backward (0: not modelled)
    case_bwd: int = 0
    r_fwd_cont: float = 0.0  # SLSQP's continuous optimum before rounding
    r_bwd_cont: float = 0.0
    predicted_fwd_s: float = 0.0  # simulated forward of the block stack
    predicted_iter_s: float = 0.0  # simulated iteration (forward + backward + last AllReduce)
    candidates: tuple = ()  # (name, seconds) of what the optimiser compared
    meta: dict = field(default_factory=dict)

    def layer_schedule(self) -> LayerSchedule:
        return LayerSchedule(self.r_fwd, self.r_bwd, self.iio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Schedule":
        d = dict(d)
        d["gar"] = GarPlan(d["gar"]["mode"], tuple(d["gar"]["window_bytes"]), d["gar"]["chunk_bytes"])
        d["candidates"] = tuple(tuple(c) for c in d.get("candidates", ()))
        return Schedule(**d)


@dataclass(frozen=True)
class Op:
    """One scheduled op. ``key`` names the Profile fit that predicts it, ``n`` its size there."""

    kind: str  # a2a_dispatch | allgather | expert | reducescatter | a2a_combine | allreduce | dense | counts
    #            | block (a whole block's span, measured) | glue (its time no other op covers)
    phase: str = "fwd"  # fwd | bwd
    layer: int = 0
    chunk: int = 0
    key: str = ""
    n: float = 0.0

    @property
    def label(self) -> str:
        return f"L{self.layer}.{self.phase}.{self.kind}[{self.chunk}]"


@dataclass(frozen=True)
class OpRecord:
    op: Op
    lane: str
    rank: int
    t0: float  # seconds since the recorder's epoch
    t1: float

    @property
    def dur(self) -> float:
        return self.t1 - self.t0

    def to_dict(self) -> dict:
        return {**asdict(self.op), "lane": self.lane, "rank": self.rank, "t0": self.t0, "t1": self.t1}

    @staticmethod
    def from_dict(d: dict) -> "OpRecord":
        op = Op(d["kind"], d["phase"], d["layer"], d["chunk"], d["key"], d["n"])
        return OpRecord(op, d["lane"], d["rank"], d["t0"], d["t1"])
