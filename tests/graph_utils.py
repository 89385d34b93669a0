"""One MoE layer's training step captured as a CUDA graph beside the same step run eagerly
(the graph tests of test_kernels.py and test_expert_gemm.py)."""
import torch


def eager_and_replayed(layer, x: torch.Tensor, dy: torch.Tensor) -> tuple[list, list]:
    """(replayed, eager): the output, the input gradient and every parameter gradient of one
    forward + backward, from a replay of the captured step and from the eager step before it."""
    from fsmoe.bench.layer import capture_graph

    out = {}

    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        y, st = layer(x)
        torch.autograd.backward([y, st.aux_loss], [dy, torch.ones_like(st.aux_loss)])
        out["y"] = y.detach()  # keeping y would keep the eager autograd graph (and its streams) alive

    step()
    eager = [out["y"].clone(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    replay = capture_graph(step)
    with torch.no_grad():
        x.add_(0)  # same inputs; the replay must recompute everything
    replay()
    torch.cuda.synchronize()
    return [out["y"], x.grad] + [p.grad for p in layer.parameters()], eager
