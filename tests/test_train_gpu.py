"""The trainer's step on a GPU (run by scripts/gpu_check.sh on the device; skipped without CUDA):
bf16 tensor-core GEMMs only, no host synchronisation inside the step, bf16 losses that track fp32."""
import io

import pytest
import torch
from rich.console import Console
from torch.utils._python_dispatch import TorchDispatchMode

from fsmoe.config import load_config
from fsmoe.train import Trainer

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

# Small, but with the shapes' alignment of the real presets (llama family: GQA, RoPE, SwiGLU experts).
MODEL = ["model.arch=\"llama\"", "model.d_model=256", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=512", "model.max_seq_len=256", "model.moe.num_experts=8", "model.moe.experts.d_ff=256",
         "model.moe.router.top_k=2"]
TRAIN = ["train.batch_size=8", "train.seq_len=256", "train.data_limit_mb=1", "train.log_every=1000",
         "train.eval_every=1000", "train.ckpt_every=0", "train.warmup_steps=5", "train.lr=1e-3",
         "train.device=\"cuda\""]

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "matmul", "linear"}
ATTENTION = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
             "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
             "_scaled_dot_product_cudnn_attention_backward"}


def steps_without_host_sync(t: Trainer, n: int) -> list:
    """``n`` steps under torch's sync debug mode "error": any host synchronisation raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return [t.train_step() for _ in range(n)]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def trainer(tmp_path, dtype: str, *extra: str) -> Trainer:
    cfg = load_config("tiny", MODEL + TRAIN + [f"train.dtype=\"{dtype}\"", "train.steps=100", *extra])
    return Trainer(cfg, tmp_path / dtype, console=Console(file=io.StringIO()))


class OperandDtypes(TorchDispatchMode):
    """Records (op name, floating input dtypes) of every matmul and attention op that runs."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS or name in ATTENTION:
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if name in ATTENTION:  # q, k, v (and grad_out first in backward); softmax stats stay fp32
                tensors = tensors[:4]
            self.seen.append((name, {a.dtype for a in tensors}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recompute", ["none", "moe"])
def test_step_runs_every_matmul_and_attention_in_bf16(tmp_path, recompute):
    # torch's grouped GEMM for the experts, so that every matmul is an aten op this mode sees (our
    # Triton GEMMs take the same bf16 operands: tests/test_expert_gemm.py)
    t = trainer(tmp_path, "bfloat16", f"train.activation_checkpointing=\"{recompute}\"",
                "model.moe.experts.gemm=\"torch\"")
    t.train_step()
    with OperandDtypes() as mode:
        t.train_step()
    names = {n for n, _ in mode.seen}
    assert "_grouped_mm" in names and names & ATTENTION, names
    fp32 = [(n, d) for n, d in mode.seen if d != {torch.bfloat16}]
    assert not fp32, f"ops with non-bf16 operands: {fp32[:10]}"
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # fp32 master weights
    assert all(s["exp_avg"].dtype == torch.float32 for s in t.optimizer.state.values())


def test_step_launches_no_fp32_gemm_kernels(tmp_path):
    from torch.profiler import ProfilerActivity, profile

    t = trainer(tmp_path, "bfloat16")
    t.train_step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t.train_step()
        torch.cuda.synchronize()
    kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    fp32_gemms = [k for k in kernels if any(s in k.lower() for s in ("sgemm", "f32f32", "_simt_", "gemm_f32"))]
    assert not fp32_gemms, fp32_gemms


def test_step_has_no_host_sync(tmp_path):
    t = trainer(tmp_path, "bfloat16")
    for _ in range(2):  # first steps: lazy optimizer state, allocator growth
        t.train_step()
    assert all(r.read().nonfinite_steps == 0 for r in steps_without_host_sync(t, 3))


def test_bf16_losses_track_fp32(tmp_path):
    """20 steps from the same weights and batches: bf16 compute stays within 5% of fp32's loss at
    every step (the trajectories drift apart slowly as rounding differences compound)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    losses = {}
    for dtype in ("float32", "bfloat16"):
        t = trainer(tmp_path, dtype)
        losses[dtype] = [t.train_step().read().loss for _ in range(20)]
    rel = [abs(a - b) / a for a, b in zip(losses["float32"], losses["bfloat16"])]
    print("bf16 vs fp32 relative loss difference per step:", [round(r, 4) for r in rel])
    assert losses["float32"][-1] < losses["float32"][0] - 0.5  # it learns
    assert max(rel) < 0.05, (rel, losses)


def test_nonfinite_step_is_skipped_on_the_device(tmp_path):
    """A NaN loss under fused AdamW: the weights and the optimizer's step count stay as they were."""
    t = trainer(tmp_path, "bfloat16", "train.on_nonfinite=\"skip\"")
    t.train_step()
    before = [p.detach().clone() for p in t.model.parameters()]
    real_loss = t.loss
    t.loss = lambda out, y: real_loss(out, y) * float("nan")
    r = t.train_step().read()
    assert r.nonfinite_steps == 1 and r.first_nonfinite == 2
    assert all(torch.equal(a, p) for a, p in zip(before, t.model.parameters()))
    assert all(int(s["step"]) == 1 for s in t.optimizer.state.values())


def test_aligned_head_on_cuda_equals_plain_linear_and_is_faster():
    """The head with V = 50257 (GPT-2) padded for the GEMMs: same bf16 logits and grads as the
    plain linear, in less time (the unaligned row stride makes cuBLAS pick alignment-1 kernels)."""
    import torch.nn.functional as F

    from fsmoe.models.decoder import ALIGN_ROWS, aligned_linear

    x = torch.randn(4096, 1600, device="cuda", requires_grad=True)
    w = torch.randn(50257, 1600, device="cuda", requires_grad=True) / 40
    dy = torch.randn(4096, 50257, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn()
        return (y, *torch.autograd.grad(y, (x, w), dy))

    def timed(fn, reps=5):
        run(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run(fn)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    plain, aligned = (lambda: F.linear(x, w)), (lambda: aligned_linear(x, w, ALIGN_ROWS))
    for a, b in zip(run(aligned), run(plain)):  # bf16 GEMMs of other kernels: relative error norm
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
    t_plain, t_aligned = timed(plain), timed(aligned)
    print(f"head fwd+bwd: plain {t_plain:.2f} ms, aligned {t_aligned:.2f} ms")
    assert t_aligned < t_plain


# ---------------------------------------------------------------- train.cuda_graph
def test_cuda_graph_steps_track_eager_steps(tmp_path):
    """The replayed steps train like eager ones: same losses (within bf16 noise and AdamW's LR held
    as a float32 tensor), same LR schedule, step count and finite flags."""
    from fsmoe.graph_step import WARMUP_STEPS

    eager = trainer(tmp_path / "e", "bfloat16")
    graph = trainer(tmp_path / "g", "bfloat16", "train.cuda_graph=true")
    a = [eager.train_step().read() for _ in range(12)]
    b = [graph.train_step().read() for _ in range(12)]
    assert graph.graphed.graph is not None and graph.step == eager.step == 12
    rel = [abs(x.loss - y.loss) / x.loss for x, y in zip(a, b)]
    print("graph vs eager relative loss difference per step:", [round(r, 5) for r in rel])
    assert max(rel[:WARMUP_STEPS]) < 1e-3 and max(rel) < 1e-2, rel
    assert [x.lr for x in a] == [y.lr for y in b]
    assert all(y.nonfinite_steps == 0 for y in b)
    assert a[-1].loss < a[0].loss and b[-1].loss < b[0].loss


def test_cuda_graph_replay_has_no_host_sync_and_its_guard_counts_steps_on_the_device(tmp_path):
    t = trainer(tmp_path, "bfloat16", "train.cuda_graph=true", "train.on_nonfinite=\"skip\"")
    for _ in range(5):  # eager warm-up, then the capture
        t.train_step()
    assert all(r.read().nonfinite_steps == 0 for r in steps_without_host_sync(t, 3))
    with torch.no_grad():  # in place: the graph reads the parameter by its address
        next(t.model.parameters()).fill_(float("nan"))
    r = t.train_step().read()
    assert r.nonfinite_steps == 1 and r.first_nonfinite == 9  # the step number advanced inside the graph


def test_cuda_graph_run_checkpoints_plain_state_and_resumes_eagerly(tmp_path):
    from fsmoe.config import load_config

    cfg = load_config("tiny", MODEL + TRAIN + ["train.dtype=\"bfloat16\"", "train.steps=8", "train.cuda_graph=true"])
    t = Trainer(cfg, tmp_path / "r", console=Console(file=io.StringIO()))
    t.fit()
    assert t.graphed.graph is not None
    sd = t.state_dict()
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in sd["optim"]["param_groups"])
    cfg2 = load_config("tiny", MODEL + TRAIN + ["train.dtype=\"bfloat16\"", "train.steps=10"])
    resumed = Trainer(cfg2, tmp_path / "r", resume=True, console=Console(file=io.StringIO()))
    assert resumed.step == 8
    assert resumed.train_step().read().nonfinite_steps == 0


def test_tracing_times_its_own_work_not_the_steps_queued_on_the_gpu(tmp_path):
    """A traced step's "trace" phase is what tracing adds (the counts' gather and reads), which
    ``fsmoe simulate step`` takes off the measured step; the step's own device work, still
    queued when tracing starts, must not land in it."""
    t = trainer(tmp_path, "bfloat16", "train.trace=true")
    seen = []
    write = t.tracer.write

    def record(step, counts, ops, choices, phases):
        seen.append(phases)
        write(step, counts, ops, choices, phases)

    t.tracer.write = record
    # 0.1-0.2 s of GPU time in every forward: the host runs far ahead of the device
    t.model.register_forward_hook(lambda *_: torch.cuda._sleep(200_000_000))
    for _ in range(3):
        t.train_step()
    last = seen[-1]
    assert last["forward"] > 0.05 and last["trace"] < 0.02, last
