"""MoELayer against a dumb per-token loop oracle: outputs and every gradient.

Shape legend: T tokens, D model dim, E experts, K experts per token, F expert hidden dim.
"""
import pytest
import torch
import torch.nn.functional as F

from fsmoe.config import ExpertsConfig, MoEConfig, RouterConfig
from fsmoe.kernels.grouped_mm import grouped_mm, padded_grouped_mm
from fsmoe.layer import HOOK_POINTS, MoELayer
from fsmoe.order import IndexOrder
from fsmoe.routing.plan import RoutingPlan


def _layer(E=4, K=2, D=8, Fh=12, act="swiglu", cap=None, shared=0, seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, router=RouterConfig(top_k=K, capacity_factor=cap, aux_loss_coef=0.0),
                    experts=ExpertsConfig(d_ff=Fh, activation=act, num_shared=shared))
    cfg.validate()
    return MoELayer(cfg, D)


def _expert(layer, e, x_D):
    ex = layer.experts
    h = x_D @ ex.w1_EDF[e]
    h = F.silu(h) * (x_D @ ex.w3_EDF[e]) if ex.w3_EDF is not None else F.gelu(h)
    return h @ ex.w2_EFD[e]


def oracle(layer, x_TD):
    """Per token: softmax router, top-k, renormalised weights, sum of weighted expert outputs."""
    K = layer.cfg.router.top_k
    probs = (x_TD @ layer.router.proj.weight.t()).float().softmax(-1)
    out = []
    for t in range(x_TD.shape[0]):
        w, ids = probs[t].topk(K)
        w = w / w.sum() if K > 1 else w
        y = sum(w[j] * _expert(layer, int(ids[j]), x_TD[t]) for j in range(K))
        if layer.shared is not None:
            y = y + layer.shared(x_TD[t])
        out.append(y)
    return torch.stack(out)


def _grads(layer, x):
    return [x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("act,K,shared", [("swiglu", 2, 0), ("gelu", 1, 0), ("swiglu", 3, 1)])
def test_layer_matches_oracle_outputs_and_grads(act, K, shared):
    layer = _layer(K=K, act=act, shared=shared)
    x = torch.randn(2, 7, 8, requires_grad=True)
    y, stats = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = _grads(layer, x)

    x2 = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    y_ref = oracle(layer, x2.view(-1, 8)).view_as(y)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, _grads(layer, x2)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert int(stats.tokens_per_expert.sum()) == 14 * K and int(stats.dropped) == 0


def test_experts_with_zero_tokens_get_zero_grad():
    layer = _layer(E=6, K=1)
    with torch.no_grad():  # make expert 0 win for every token: experts 1..5 get nothing
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[0] = 1.0
    x = torch.rand(9, 8) + 0.1
    x.requires_grad_(True)
    y, stats = layer(x)
    y.pow(2).sum().backward()
    assert stats.tokens_per_expert.tolist() == [9, 0, 0, 0, 0, 0]
    torch.testing.assert_close(y, oracle(layer, x), atol=1e-5, rtol=1e-5)
    for w in (layer.experts.w1_EDF, layer.experts.w3_EDF, layer.experts.w2_EFD):
        assert w.grad[1:].abs().max() == 0 and w.grad[0].abs().max() > 0


def test_capacity_drops_are_counted_and_zeroed():
    layer = _layer(E=4, K=1, cap=0.5)  # capacity = ceil(0.5 * 16 / 4) = 2 per expert
    x = torch.randn(16, 8, requires_grad=True)
    y, stats = layer(x)
    y.sum().backward()
    counts = stats.tokens_per_expert
    assert int(counts.max()) <= 2 and int(counts.sum() + stats.dropped) == 16
    x2 = x.detach().clone().requires_grad_(True)
    probs = (x2 @ layer.router.proj.weight.t()).softmax(-1)
    ids = probs.argmax(-1)
    ref = torch.zeros(16, 8)
    for e in range(4):  # earlier tokens win the slots of an expert; later ones get output 0
        for t in (ids == e).nonzero().flatten().tolist()[:2]:
            ref[t] = _expert(layer, e, x2[t]) * probs[t, e]
    ref.sum().backward()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)  # dropped rows pass no gradient


def test_first_choices_have_capacity_priority():
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 1]])
    w_TK = torch.full((3, 2), 0.5)
    plan = RoutingPlan.from_topk(ids_TK, w_TK, 2, capacity=2)
    kept = {(int(t), int(e)) for t, e in zip(plan.token_ids_N, plan.expert_ids_N) if e < 2}
    # expert 0: first choices of tokens 0 and 2 beat token 1's second choice
    assert kept == {(0, 0), (2, 0), (1, 1), (0, 1)}
    assert int(plan.dropped) == 2 and plan.tokens_per_expert_E.tolist() == [2, 2]
    assert plan.expert_ids_N[-2:].tolist() == [2, 2] and plan.weights_N[-2:].abs().sum() == 0


def test_permute_unpermute_round_trip():
    T, K, E, D = 11, 3, 5, 6
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.full((T, K), 1.0 / K)
    plan = RoutingPlan.from_topk(ids, w, E)
    x = torch.randn(T, D, requires_grad=True)
    order = IndexOrder()
    x_ND = order.permute(x, plan)
    assert (plan.expert_ids_N[1:] >= plan.expert_ids_N[:-1]).all()  # grouped by expert
    back = order.unpermute(x_ND, plan)
    torch.testing.assert_close(back, x)
    back.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_hand_worked_permutation_with_empty_expert():
    ids = torch.tensor([[2], [0], [2], [0]])
    plan = RoutingPlan.from_topk(ids, torch.ones(4, 1), 3)
    assert plan.token_ids_N.tolist() == [1, 3, 0, 2]
    assert plan.tokens_per_expert_E.tolist() == [2, 0, 2]


def test_every_hook_fires_and_can_replace():
    layer = _layer()
    seen = []
    for point in HOOK_POINTS:
        layer.register_hook(point, lambda _layer, t, p=point: seen.append(p))
    h = layer.register_hook("layer_end", lambda _layer, t: t * 0)
    y, _ = layer(torch.randn(5, 8))
    assert seen == list(HOOK_POINTS) and y.abs().max() == 0
    h.remove()
    y, _ = layer(torch.randn(5, 8))
    assert y.abs().max() > 0
    with pytest.raises(ValueError, match="hook point"):
        layer.register_hook("nowhere", lambda *_: None)


@pytest.mark.parametrize("dims", [(8, 4), (6, 5)])  # aligned -> grouped_mm; odd -> padded fallback
@pytest.mark.parametrize("tail", [2, 0])  # trailing rows that belong to nobody (0: dropless, no masks on the CPU)
def test_grouped_mm_matches_loop(dims, tail):
    I, O = dims
    counts = torch.tensor([3, 0, 4, 1])
    x = torch.randn(int(counts.sum()) + tail, I, requires_grad=True)
    w = torch.randn(4, I, O, requires_grad=True)
    offs = counts.cumsum(0).to(torch.int32)
    y_all = grouped_mm(x, w, offs)
    assert y_all[offs[-1]:].abs().sum() == 0  # the tail gives 0
    y = y_all[: offs[-1]]
    y.sum().backward()  # stride-0 incoming gradient: must not break grouped_mm
    assert x.grad[offs[-1]:].abs().sum() == 0  # and gets no gradient
    ref = torch.cat([x[s - c: s] @ w[e] for e, (c, s) in enumerate(zip(counts, offs.long()))])
    torch.testing.assert_close(y, ref)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref.sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(padded_grouped_mm(x, w, offs)[: offs[-1]], ref)
