"""FSMoE's layer grid on its testbeds, simulated: 3^6 x 2 = 1458 configured layers planned and
timed under every schedule by the cluster simulator (``fsmoe.sim.cluster``).

The grid (FSMoE §6): B in {1, 2, 4}, heads in {8, 16, 32}, L in three sequence lengths of the
testbed, M in {1024, 2048, 4096}, H/M in {2, 3, 4}, capacity factor in {1.2, 2.4, dropless},
FFN in {GeLU MLP, Mixtral's SwiGLU}; top-2, one expert per node (E = nodes), EP across the nodes
and ESP over the GPUs of a node, 2 blocks per config.

Testbeds, as the paper describes them (compute scaled from the measured profile by the GPUs'
published dense bf16/fp16 tensor throughput; one NIC per node shared by its GPUs, modelled as
an equal share per GPU; intra-node links as PCIe):

* ``a``: 6 nodes x 8 RTX A6000 (154.8 TFLOP/s), 200 Gb/s InfiniBand, L in {512, 1024, 2048};
* ``b``: 8 nodes x 4 RTX 2080 Ti (53.8 TFLOP/s with fp32 accumulation), 100 Gb/s, PCIe 3,
  L in {256, 512, 1024}.
"""
from __future__ import annotations

import itertools
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from fsmoe.parallel.layout import Layout
from fsmoe.schedule.model.plan import links
from fsmoe.schedule.model.profile import Profile
from fsmoe.schedule.types import LayerSpec

POLICIES = ("default", "tutel_improved", "pipemoe_lina", "fsmoe_no_iio", "fsmoe")


@dataclass(frozen=True)
class Testbed:
    nodes: int
    gpus_per_node: int
    nic_gbps_per_node: float
    intra_gbps: float  # per GPU and direction inside a node
    tflops: float  # published dense tensor throughput of one GPU
    seq_lens: tuple[int, int, int]

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def layout(self) -> Layout:
        return Layout(dp=self.gpus, ep=self.nodes, esp=self.gpus_per_node, gpus_per_node=self.gpus_per_node)

    def fabric(self):
        from fsmoe.sim.fabrics import LeafSpine

        return LeafSpine(self.gpus, self.gpus_per_node, self.gpus, self.nic_gbps_per_node / self.gpus_per_node,
                         self.intra_gbps)


TESTBEDS = {"a": Testbed(6, 8, 200.0, 256.0, 154.8, (512, 1024, 2048)),
            "b": Testbed(8, 4, 100.0, 128.0, 53.8, (256, 512, 1024))}
H200_TFLOPS = 989.0  # dense bf16, SXM


def grid(testbed: Testbed) -> list[LayerSpec]:
    """The 1458 configured layers, in a fixed order."""
    axes = ((1, 2, 4), (8, 16, 32), testbed.seq_lens, (1024, 2048, 4096), (2, 3, 4), (1.2, 2.4, None),
            ("gelu", "swiglu"))
    return [LayerSpec(batch=B, seq_len=L, d_model=M, d_ff=hm * M, num_experts=testbed.nodes, top_k=2, n_heads=h,
                      capacity_factor=f, activation=act, n_layers=2, dtype_bytes=2, grad_bytes=2)
            for B, h, L, M, hm, f, act in itertools.product(*axes)]


def _one(args) -> dict:
    from fsmoe.schedule.model.plan import plan

    spec, layout, prof = args
    out = {"spec": [spec.batch, spec.n_heads, spec.seq_len, spec.d_model, spec.d_ff, spec.capacity_factor,
                    spec.activation]}
    for p in POLICIES:
        s = plan(spec, layout, prof, p)
        out[p] = {"ms": s.predicted_iter_s * 1e3, "r": [s.r_fwd, s.r_bwd]}
    return out


def run_grid(measured: Profile, testbed: Testbed, *, ref_tflops: float = H200_TFLOPS, every: int = 1,
             workers: int = 1) -> dict:
    """Every ``every``-th config of the grid under every schedule; speedups of FSMoE (geomean)."""
    from fsmoe.sim.cluster import cluster_profile

    layout = testbed.layout
    prof = cluster_profile(measured, layout, testbed.fabric(), gemm_scale=testbed.tflops / ref_tflops)
    specs = grid(testbed)[::every]
    jobs = [(s, layout, prof) for s in specs]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            rows = list(ex.map(_one, jobs, chunksize=8))
    else:
        rows = [_one(j) for j in jobs]

    def geomean(base: str, over: str = "fsmoe") -> float:
        return math.exp(sum(math.log(r[base]["ms"] / r[over]["ms"]) for r in rows) / len(rows))

    summary = {f"fsmoe_over_{b}": geomean(b) for b in POLICIES if b != "fsmoe"}
    summary.update({f"{b}_over_default": geomean("default", b) for b in POLICIES if b != "default"})
    summary["fsmoe_pipelines"] = sum(r["fsmoe"]["r"] != [1, 1] for r in rows)
    summary["fsmoe_r_fwd_ne_r_bwd"] = sum(r["fsmoe"]["r"][0] != r["fsmoe"]["r"][1] for r in rows)
    return {"testbed": testbed.__dict__ | {"gpus": testbed.gpus}, "configs": len(rows), "links": links(prof),
            "summary": summary, "rows": rows}


# FSMoE over Tutel-Improved and over FSMoE without IIO, from the paper's speedups over Tutel+PipeMoE
PAPER = {"a": {"tutel_improved": 1.18 / 1.09, "fsmoe_no_iio": 1.18 / 1.12},
         "b": {"tutel_improved": 1.22 / 1.08, "fsmoe_no_iio": 1.22 / 1.16}}


def plot_grid(rep: dict, png: str, testbed: str) -> None:
    """Histogram of FSMoE's speedup per config over each baseline, the geomean marked, and the
    paper's FSMoE / Tutel-Improved ratio where it reports one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = ("default", "tutel_improved", "pipemoe_lina", "fsmoe_no_iio")
    fig, axes = plt.subplots(1, len(bases), figsize=(14, 3.2), sharey=True)
    for ax, b in zip(axes, bases):
        x = [r[b]["ms"] / r["fsmoe"]["ms"] for r in rep["rows"]]
        ax.hist(x, bins=30, color="#4c72b0")
        g = rep["summary"][f"fsmoe_over_{b}"]
        ax.axvline(g, color="k", linestyle="--", label=f"geomean {g:.3f}x")
        if b in PAPER.get(testbed, {}):
            ax.axvline(PAPER[testbed][b], color="#c44e52", label=f"paper {PAPER[testbed][b]:.3f}x")
        ax.set_title(f"FSMoE over {b}", fontsize=9)
        ax.set_xlabel("speedup")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("configs")
    fig.suptitle(f"FSMoE's layer grid, testbed {testbed.upper()} ({rep['configs']} configs, simulated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
