"""Decode steps replayed from CUDA graphs, cut where a MoE layer must ask the host.

Shape legend: B rows, S cache slots, V vocabulary, N routed rows of one MoE layer.

A decode step launches a few hundred small kernels per layer (norms, projections, RoPE, the
cache write, attention, the router, the dispatch order); issued one by one from Python they take
longer than the GPU needs to run them. Captured once and replayed, they cost one launch.

A layer whose executor needs the host (the hybrid engine reads each layer's token counts to split
its experts between GPU, PCIe and CPU: ``executor.needs_host``, or ``executor.needs_host_for(B)``
where that depends on the step's size) cannot be inside a graph. The
capture is therefore cut there: the graph ends with the layer's routed rows ``x_ND`` and its
``RoutingPlan``; at replay the executor runs eagerly on them and writes its output into a fixed
buffer ``y_ND`` that the next graph reads. A step is then

    graph 0 (embedding .. layer 0's router and order), executor 0, graph 1 (layer 0's combine ..
    layer 1's order), executor 1, ..., graph L (last combine, norm, head -> logits)

Executors that need no host (the plain model's) stay inside the graphs: one graph per step.

Every shape and address must be the same at each step: the token ids, the slot (a 0-dim tensor,
see fsmoe.models.kv_cache) and the rows' padding are copied into fixed buffers, and the KV cache
is the runner's own (:attr:`GraphedDecode.cache`, sized once; prefill writes into it eagerly).
The first two steps of a runner run eagerly with these buffers (warming every kernel and
allocation up on the runner's stream; the second checks that nothing outside the cut executors
reads the device from the host), then the capture is made; later steps replay it. A step that
cannot be captured is reported once and the runner stays eager.
"""
from __future__ import annotations

import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fsmoe.models.kv_cache import KVCache


# Eager steps before the capture: the first lets one-time work happen (e.g. the expert GEMMs timing
# their kernels at the decode step's new shape, which reads the device), the second is checked for
# host syncs (see GraphedDecode._checked).
WARM_STEPS = 2


@dataclass
class Cut:
    """Where a graph ends: one MoE layer's executor, the graph outputs it reads and the buffer its
    output goes to (read by the next graph)."""

    executor: object
    layer: nn.Module
    x_ND: Tensor
    plan: object  # fsmoe.routing.plan.RoutingPlan, its tensors graph outputs
    y_ND: Tensor


class GraphedDecode:
    """Decode steps of ``model`` for ``batch`` rows and up to ``slots`` cache slots, replayed."""

    def __init__(self, model: nn.Module, batch: int, slots: int):
        self.model = model
        device = next(model.parameters()).device
        self.cache = KVCache.for_model(model, batch, slots)
        self.idx_B1 = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.pad_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.stream = torch.cuda.Stream(device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.cuts: list[Cut] = []
        self.logits_BV: Tensor | None = None
        self.failed: str | None = None  # why the capture failed (the runner then stays eager)
        self.warm = 0  # eager steps taken before the capture (WARM_STEPS)
        # the executors, and which need the host, when the runner was made, then when checked and
        # captured (see DecodeGraphs.runner)
        self.executors = cut_plan(model, batch)

    @property
    def batch(self) -> int:
        return self.idx_B1.shape[0]

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def step(self, idx_B1: Tensor, start: int, pad_B: Tensor) -> Tensor:
        """Logits [B, V] of the tokens ``idx_B1`` [B, 1] at slot ``start``; the cache gets slot ``start``."""
        if start + 1 > min(self.cache.slots, self.model.cfg.max_seq_len):
            raise ValueError(f"slot {start} is past the decode graph's cache ({self.cache.slots} slots) "
                             f"or model.max_seq_len={self.model.cfg.max_seq_len}")
        self.idx_B1.copy_(idx_B1)
        self.start.fill_(start)
        self.pad_B.copy_(pad_B)
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            if self.failed is not None:
                logits_BV = self._eager()
            elif self.warm < WARM_STEPS:
                logits_BV = self._eager() if self.warm == 0 else self._checked()
                self.warm += 1
            elif not self.captured and not same_cuts(self.executors, cut_plan(self.model, self.batch)):
                # an executor changed where it runs since the checked step (the adaptive policy's race
                # settled): that path is warmed and checked before it is captured
                logits_BV = self._checked()
            else:
                if not self.captured:
                    self._capture()
                logits_BV = self._replay() if self.captured else self._eager()
        caller.wait_stream(self.stream)
        return logits_BV

    def _eager(self) -> Tensor:
        return self.model(self.idx_B1, cache=self.cache, start=self.start, pad_B=self.pad_B).logits[:, -1]

    def _replay(self) -> Tensor:
        for graph, cut in zip(self.graphs, self.cuts):
            graph.replay()
            cut.y_ND.copy_(cut.executor(cut.layer, cut.x_ND, cut.plan))
        self.graphs[-1].replay()
        return self.logits_BV.clone()

    @contextmanager
    def _executors(self, wrap):
        """Every executor that needs the host replaced by ``wrap(executor)`` inside the block."""
        layers = [m for m in self.model.modules() if _needs_host(getattr(m, "executor", None), self.batch)]
        saved = [m.executor for m in layers]
        for m, ex in zip(layers, saved):
            m.executor = wrap(ex)
        try:
            yield
        finally:
            for m, ex in zip(layers, saved):
                m.executor = ex

    def _give_up(self, why: str) -> None:
        self.failed = why
        warnings.warn(f"decode steps run eagerly: a step cannot be captured in a CUDA graph ({why})", stacklevel=4)

    def _checked(self) -> Tensor:
        """An eager step watched for host syncs anywhere but in the executors that need the host: a
        capture could not hold one, and a capture that fails midway leaves the CUDA generator and
        allocator in capture mode. One found, the runner stays eager and says where it was.
        ("warn" mode, not "error": the step completes, and the warning's Python stack is the
        op's caller's.)"""
        mode = torch.cuda.get_sync_debug_mode()

        def allowed(executor):
            def run(layer, x_ND, plan):
                torch.cuda.set_sync_debug_mode(mode)
                try:
                    return executor(layer, x_ND, plan)
                finally:
                    torch.cuda.set_sync_debug_mode("warn")
            return run

        syncs, others = [], []

        def seen(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if SYNC_WARNING in text:  # the Python stack is the op's caller's, still intact here
                op = text.strip().splitlines()[0].split(" (Triggered internally")[0]
                syncs.append(f"{op} at {_sync_site(traceback.extract_stack()[:-1])}")
            elif "prototype" not in text:  # torch's note that the sync check is a prototype
                others.append((message, category, filename, lineno))

        self.executors = cut_plan(self.model, self.batch)
        with self._executors(allowed), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = seen
            torch.cuda.set_sync_debug_mode("warn")
            try:
                logits_BV = self._eager()
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        for w in others:  # the step's own warnings, as they came
            warnings.warn_explicit(*w)
        if syncs:
            self._give_up(syncs[0])
        return logits_BV

    def _capture(self) -> None:
        """Capture the step, cut at every executor that needs the host (see the module docstring)."""
        pool = torch.cuda.graph_pool_handle()
        graphs, cuts = [torch.cuda.CUDAGraph()], []

        def cut_at(executor):
            def run(layer, x_ND, plan):
                graphs[-1].capture_end()
                cuts.append(Cut(executor, layer, x_ND, plan, torch.empty_like(x_ND)))
                graphs.append(torch.cuda.CUDAGraph())
                graphs[-1].capture_begin(pool=pool, capture_error_mode="thread_local")
                return cuts[-1].y_ND
            return run

        with self._executors(cut_at):
            try:
                graphs[0].capture_begin(pool=pool, capture_error_mode="thread_local")
                logits_BV = self._eager()
                graphs[-1].capture_end()
            except RuntimeError as e:  # an op the sync check did not see (e.g. a copy from pageable memory)
                self._give_up(str(e).strip().splitlines()[0])
                return
        self.graphs, self.cuts, self.logits_BV = graphs, cuts, logits_BV


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's sync check, in "warn" mode


def _relative(filename: str) -> str:
    """``fsmoe/...`` for a file of this package, else the path as given."""
    here = Path(__file__).resolve().parents[1]
    path = Path(filename).resolve()
    return str(path.relative_to(here.parent)) if path.is_relative_to(here) else filename


def _needs_host(executor, tokens: int) -> bool:
    """Whether a layer's executor reads the host in a step of ``tokens`` tokens (then the graph is
    cut there): ``executor.needs_host_for(tokens)`` where it says, else ``executor.needs_host``."""
    ask = getattr(executor, "needs_host_for", None)
    return ask(tokens) if ask is not None else bool(getattr(executor, "needs_host", False))


def _sync_site(stack: list[traceback.FrameSummary]) -> str:
    """Where a flagged sync came from: ``FILE:LINE`` of the innermost frame outside torch and the
    warnings machinery that reported it (the code that called the op; e.g.
    fsmoe/kernels/grouped_mm.py for torch's grouped GEMM off bf16, which reads the expert offsets
    on the host)."""
    paths = [_relative(f.filename).replace("\\", "/") for f in stack]
    callers = [(p, f) for p, f in zip(paths, stack) if "/torch/" not in p and not p.endswith("warnings.py")]
    path, f = (callers or list(zip(paths, stack)))[-1]
    return f"{path}:{f.lineno}"


def executors_of(model: nn.Module) -> tuple:
    """Every layer's executor object, in module order."""
    return tuple(m.executor for m in model.modules() if hasattr(m, "executor"))


def cut_plan(model: nn.Module, tokens: int) -> tuple[tuple[object, bool], ...]:
    """Every layer's executor object, and whether a step of ``tokens`` tokens cuts the graph there."""
    return tuple((ex, _needs_host(ex, tokens)) for ex in executors_of(model))


def same_cuts(a: tuple, b: tuple) -> bool:
    """Whether two :func:`cut_plan` s hold the same executor objects, cut at the same layers."""
    return len(a) == len(b) and all(x is y and cx == cy for (x, cx), (y, cy) in zip(a, b))


class DecodeGraphs:
    """One :class:`GraphedDecode` per batch size, kept across ``generate`` calls (a capture costs
    about one eager step; a server captures once per batch size). Executors that need the host run
    outside the graphs, so a hybrid model placed anew (``HybridModel.place``) with the same executor
    objects keeps its captures; new executor objects (another placement's in-graph executors, e.g.
    the streaming policy's in-place one, whose graph holds its resident copies) make a new capture."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.runners: dict[int, GraphedDecode] = {}

    def runner(self, batch: int, slots: int) -> GraphedDecode:
        r = self.runners.get(batch)
        stale = r is not None and not same_cuts(r.executors, cut_plan(self.model, batch))
        if r is None or r.cache.slots < slots or stale:  # a longer generation, or other executors: a new capture
            self.runners.pop(batch, None)  # free the old cache and graphs first
            r = self.runners[batch] = GraphedDecode(self.model, batch, slots)
        return r
