"""Per-shape choice of the expert MLP's GEMMs: our Triton kernels (with which tiles), torch's
grouped GEMM, or one cuBLAS GEMM per expert, measured once on the card and kept in a small JSON
cache.

Shape legend: N routed rows, D model dim, F expert hidden dim (this shard's), E local experts.

The first forward at a new (card, dtype, N, D, F, E) times every candidate tile shape of each of
the four kernels (up-projection with SwiGLU, down-projection, input gradient, weight gradient) on
rows shared among the experts as that forward routed them (scaled to the shape's row bucket), then
the whole forward + backward of the best Triton tiles
against torch's path and the per-expert cuBLAS path (``fsmoe.kernels.expert_loop``), and keeps
the fastest; the cuBLAS path reads the routing counts on the host, so it must win by the margin
over the faster grouped path, and inside a CUDA-graph capture the grouped path runs. The choice is written to
``$FSMOE_CACHE_DIR/expert_gemm.json`` (default ``~/.cache/fsmoe``) so later runs skip the timing.
Timing a shape takes 1-3 s on an H100/H200; it happens outside any CUDA-graph capture because
the first forward of a step always runs eagerly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fsmoe.kernels.tiles import MLPTiles, TileConfig

_T = TileConfig
# Candidates per kernel: (bm, bn, bk, group_m, warps, stages, tma). The TMA shapes won every kernel
# at every shape of the layer benchmark on an H200 (benchmarks/results/expert_gemm/); one pointer
# shape each remains for cards without TMA (it is skipped wherever it does not compile).
# The dual-accumulator up-projection holds two fp32 tiles.
UP = (_T(128, 128, 64, 8, 8, 3, True), _T(128, 128, 64, 8, 8, 4, True), _T(128, 64, 64, 8, 4, 4, True),
      _T(64, 128, 64, 8, 4, 3, True), _T(128, 128, 64, 8, 8, 3))
GMM = (_T(128, 256, 64, 8, 8, 3, True), _T(256, 128, 64, 8, 8, 3, True), _T(128, 128, 64, 8, 8, 3, True),
       _T(64, 128, 64, 8, 4, 4, True), _T(128, 256, 64, 8, 8, 3))
# Weight gradient: bm is the rows per step, bk the I tile, bn the O tile.
WGRAD = (_T(64, 256, 128, 8, 8, 3, True), _T(64, 128, 256, 8, 8, 3, True), _T(32, 128, 128, 8, 4, 4, True),
         _T(64, 128, 128, 8, 8, 3, True), _T(64, 128, 128, 8, 8, 3))


WIN_MARGIN = 0.97  # ours must be at least 3% faster to be chosen under experts.gemm=auto
# the per-expert cuBLAS path is timed only where experts average this many rows: below it its
# launches (eight per expert) and the host sync cost more than any GEMM could win
CUBLAS_MIN_ROWS = 1024
ROUNDS = 5  # rounds of timing every path


@dataclass(frozen=True)
class GemmChoice:
    """One shape's measurement: our best tiles, and forward + backward of the whole MLP with them
    (``triton_ms``), with torch's grouped GEMM path (``torch_ms``) and with one cuBLAS GEMM per
    expert (``cublas_ms``)."""

    tiles: MLPTiles
    triton_ms: float
    torch_ms: float
    cublas_ms: float = float("inf")

    @property
    def ours_faster(self) -> bool:
        """By a margin: the timing takes one forward's routing, later forwards route otherwise,
        and a near tie measured on one routing went either way in the layer benchmark."""
        return self.triton_ms < WIN_MARGIN * self.torch_ms

    def path(self, capturing: bool = False) -> str:
        """One of "triton", "torch", "cublas": the grouped path that won, or the per-expert one where
        it beat that by the margin too (it syncs on the host, so never inside a graph capture)."""
        grouped, grouped_ms = ("triton", self.triton_ms) if self.ours_faster else ("torch", self.torch_ms)
        return "cublas" if not capturing and self.cublas_ms < WIN_MARGIN * grouped_ms else grouped


def cache_path() -> Path:
    root = os.environ.get("FSMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fsmoe")
    return Path(root) / "expert_gemm.json"


def row_bucket(N: int) -> int:
    """Rows are keyed by the next power of two: under expert parallelism the rows a rank receives
    change every step, and the best tiles hardly move within a factor of two."""
    return 1 << max(N - 1, 0).bit_length()


@functools.cache
def _card(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def shape_key(x_ND: Tensor, w1_EDF: Tensor) -> str:
    E, D, F = w1_EDF.shape
    name = _card(x_ND.device.index if x_ND.device.index is not None else torch.cuda.current_device())
    # v2: with the per-expert cuBLAS path timed too (entries without it are timed again)
    return f"{name}|{str(x_ND.dtype).removeprefix('torch.')}|N{row_bucket(x_ND.shape[0])}|D{D}|F{F}|E{E}|v2"


def _to_json(c: GemmChoice) -> dict:
    return {"tiles": {k: dataclasses.asdict(v) for k, v in vars(c.tiles).items()},
            "triton_ms": c.triton_ms, "torch_ms": c.torch_ms, "cublas_ms": c.cublas_ms}


def _from_json(d: dict) -> GemmChoice:
    tiles = MLPTiles(**{k: TileConfig(**v) for k, v in d["tiles"].items()})
    return GemmChoice(tiles, float(d["triton_ms"]), float(d["torch_ms"]), float(d.get("cublas_ms", "inf")))


class ChoiceCache:
    """The JSON file, read once; an unreadable file is ignored (and rewritten), never fatal."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        self._mem: dict[str, GemmChoice] | None = None

    def _load(self) -> dict[str, GemmChoice]:
        if self._mem is None:
            self._mem = {}
            try:
                raw = json.loads(self.path.read_text())
                self._mem = {k: _from_json(v) for k, v in raw.items()}
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return self._mem

    def get(self, key: str) -> GemmChoice | None:
        return self._load().get(key)

    def put(self, key: str, choice: GemmChoice) -> None:
        self._load()[key] = choice
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({k: _to_json(v) for k, v in self._load().items()}, f, indent=1)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home keeps the choice for this process only
            pass


_CACHE = ChoiceCache()


def _same(t: Tensor) -> Tensor:
    return t


def _note(msg: str) -> None:
    print(f"fsmoe: {msg}", file=sys.stderr, flush=True)


def _bench_ms(fn, reps: int = 10) -> float:
    """Median ms of ``fn`` on the current stream (CUDA events), after two warm-up calls."""
    for _ in range(2):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


class NoTileCompiles(RuntimeError):
    """No candidate of one of our kernels compiled on this card (an old Triton, an unusual GPU)."""


def _best(cands, run) -> tuple[TileConfig, float]:
    """The fastest candidate that compiles on this card (shared memory, registers and TMA vary)."""
    best, best_ms = None, float("inf")
    for c in cands:
        try:
            ms = _bench_ms(lambda: run(c))
        except Exception:  # noqa: BLE001 - Triton's OutOfResources, compile errors, no TMA: skip the shape
            torch.cuda.synchronize()  # ... but a fault on the device is not a shape to skip: raise it
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise NoTileCompiles("none of the candidate tile shapes compiled on this card")
    return best, best_ms


def even_offsets(N: int, E: int, device) -> Tensor:
    """[E] int32 cumulative ends of N rows spread evenly over E experts."""
    counts = torch.full((E,), N // E, dtype=torch.int32, device=device)
    counts[: N % E] += 1
    return torch.cumsum(counts, 0, dtype=torch.int32)


def _randn(gen: torch.Generator, like: Tensor, *shape: int) -> Tensor:
    """Random operands from our own generator: tuning must not move the training's RNG stream."""
    return torch.randn(shape or like.shape, generator=gen, device=like.device, dtype=like.dtype)


def bucket_offsets(offs_E: Tensor, N: int) -> Tensor:
    """[E] int32 cumulative ends of N rows shared among the experts as ``offs_E`` shares its rows
    (rounded down, the remainder one row each to the first experts); evenly where it has none."""
    E = offs_E.shape[0]
    ends = offs_E.long().cpu()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    total = int(counts.sum())
    if total <= 0:
        return even_offsets(N, E, offs_E.device)
    scaled = counts * N // total
    scaled[: N - int(scaled.sum())] += 1
    return torch.cumsum(scaled, 0).to(torch.int32).to(offs_E.device)


def tune_tiles(x_ND: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, offs_E: Tensor | None = None) -> MLPTiles:
    """The fastest tile shape of each kernel at this shape, x_ND's rows spread over the experts by
    ``offs_E`` ([E] int32 cumulative ends, the last x_ND's rows), else evenly."""
    from fsmoe.kernels import triton_gmm as tg

    E, D, F = w1_EDF.shape
    N = x_ND.shape[0]
    gen = torch.Generator(device=x_ND.device).manual_seed(0)
    offs = even_offsets(N, E, x_ND.device) if offs_E is None else offs_E
    x = _randn(gen, x_ND)
    w1, w3, w2 = (_randn(gen, x, *w.shape) for w in (w1_EDF, w1_EDF, w2_EFD))
    h = _randn(gen, x, N, F)
    up, _ = _best(UP, lambda c: tg.gmm_swiglu(x, w1, w3, offs, cfg=c))
    down, _ = _best(GMM, lambda c: tg.gmm(h, w2, offs, cfg=c))
    dgrad, _ = _best(GMM, lambda c: tg.gmm(h, w1.transpose(1, 2), offs, a2=h, b2_EIO=w3.transpose(1, 2), cfg=c))
    wgrad, _ = _best(WGRAD, lambda c: tg.gmm_wgrad(x, h, offs, E, cfg=c))
    return MLPTiles(up=up, down=down, dgrad=dgrad, wgrad=wgrad)


def measure_choice(x_ND: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, offs_E: Tensor | None = None) -> GemmChoice:
    """Tune the Triton tiles, then time forward + backward of the three paths at this shape: the
    rows' power-of-two bucket, shared among the experts as the forward that asked (``offs_E``)
    routed its rows, else evenly. (On an H200, with rows spread evenly, the per-expert cuBLAS path
    timed 0.98-1.05x torch's grouped GEMM's time at Mixtral's and GPT-2-XL's layer shapes, where
    the layer, routed, ran 1.04-1.06x faster on it.)"""
    from fsmoe.kernels.expert_gemm import triton_swiglu_mlp
    from fsmoe.kernels.expert_loop import per_expert_mlp
    from fsmoe.kernels.experts import expert_mlp

    x_ND = x_ND.new_empty(row_bucket(x_ND.shape[0]), x_ND.shape[1])
    N, E = x_ND.shape[0], w1_EDF.shape[0]
    offs = even_offsets(N, E, x_ND.device) if offs_E is None else bucket_offsets(offs_E, N)
    tiles = tune_tiles(x_ND, w1_EDF, w2_EFD, offs)
    gen = torch.Generator(device=x_ND.device).manual_seed(1)
    x = _randn(gen, x_ND).requires_grad_()
    w1, w3, w2 = (_randn(gen, x, *w.shape).requires_grad_() for w in (w1_EDF, w1_EDF, w2_EFD))
    dy = _randn(gen, x)

    def step(fn):
        def run():
            with torch.enable_grad():
                torch.autograd.grad(fn(x, w1, w3, w2, offs), (x, w1, w3, w2), dy)
        return run

    # alternated, median of rounds: back-to-back timings of one path drift by several percent on a
    # card (clocks, temperature), as much as the difference being measured
    paths = [step(lambda *a: triton_swiglu_mlp(*a, tiles)), step(expert_mlp)]
    if x.shape[0] >= CUBLAS_MIN_ROWS * w1.shape[0]:
        paths.append(step(per_expert_mlp))
    # each round starts with another path, so none is always timed after seconds of the others at
    # full power (the clocks drift: timed last in every round, the cuBLAS path took 1.05x torch's
    # time at Mixtral's shape on an H200; with the rounds starting in turn, on another, 0.98x)
    n = len(paths)
    rounds = [{i: _bench_ms(paths[i]) for i in [(r + j) % n for j in range(n)]} for r in range(ROUNDS)]
    return GemmChoice(tiles, *(statistics.median(r[i] for r in rounds) for i in range(n)))


def choose(x_ND: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, cache: ChoiceCache | None = None,
           offs_E: Tensor | None = None) -> GemmChoice | None:
    """The cached choice for this shape, measured on first use (on ``offs_E``'s routing, when
    given); None while a CUDA graph is being captured and the shape was never measured (nothing
    can be timed inside a capture)."""
    cache = cache or _CACHE
    key = shape_key(x_ND, w1_EDF)
    got = cache.get(key)
    if got is None and torch.cuda.is_current_stream_capturing():
        return None
    if got is None:
        _note(f"timing the expert GEMMs at {key} (once per shape and card; kept in {cache.path})")
        # our own autograd graphs: no autocast, and none of an enclosing activation checkpoint's
        # saved-tensor hooks (the first forward may run inside one)
        try:
            with torch.autocast("cuda", enabled=False), torch.autograd.graph.saved_tensors_hooks(_same, _same):
                got = measure_choice(x_ND.detach(), w1_EDF.detach(), w2_EFD.detach(), offs_E)
        except NoTileCompiles as e:  # recorded, so later runs do not try again: torch's path it is
            got = GemmChoice(MLPTiles(), float("inf"), 0.0)
            _note(f"our expert GEMMs do not run here ({e})")
        cache.put(key, got)
        names = {"triton": "ours", "torch": "torch grouped_mm", "cublas": "cuBLAS per expert"}
        _note(f"expert GEMMs at {key}: {names[got.path()]} (forward + backward {got.triton_ms:.2f} ms ours, "
              f"{got.torch_ms:.2f} ms torch grouped_mm, {got.cublas_ms:.2f} ms cuBLAS per expert)")
    return got
