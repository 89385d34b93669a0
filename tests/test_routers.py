"""Routers against plain references (Python loops over tokens/experts, written independently).

Shape legend: T tokens, D model dim, E experts, K experts per token, N assignments,
B sequences, L sequence length, S slots per expert, X = E*S slots, G expert groups.

Trick used throughout (``dictate``): with ``x_TD = I`` (D = T) and ``proj.weight = logits_TE.T`` a
linear router's logits are exactly ``logits_TE``, so a test can dictate every token's scores.
"""
from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

import fsmoe.routing
from fsmoe.config import ConfigError, ModelConfig, MoEConfig, RouterConfig
from fsmoe.layer import MoELayer
from fsmoe.order import SoftOrder
from fsmoe.routing import ROUTERS, build_router
from fsmoe.routing.plan import RoutingPlan, expert_capacity

ALL = ["gshard", "sigmoid", "xmoe", "softmoe", "expert_choice", "deepseek"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(name: str, E: int = 4, D: int = 6, **kw):
    cfg = RouterConfig(name=name, **kw)
    cfg.validate(E)
    return build_router(cfg, D, E)


def dictate(router, logits_TE: torch.Tensor) -> torch.Tensor:
    """Give a linear router a [T -> E] projection so that input I_T yields ``logits_TE``;
    returns that input [T, T]."""
    T, E = logits_TE.shape
    router.proj = torch.nn.Linear(T, E, bias=False)
    with torch.no_grad():
        router.proj.weight.copy_(logits_TE.t())
    return torch.eye(T)


# ---------------------------------------------------------------- plain references


def softmax_row(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    return [v / sum(ex) for v in ex]


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def topk_row(row, k):
    """Indices of the k largest values, best first (ties by lower index)."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]


def ref_layout(ids_TK, w_TK, E, cap):
    """Capacity by hand: first choices of all tokens, then second choices, ...; earlier token wins."""
    kept = {e: [] for e in range(E)}
    dropped = []
    T, K = len(ids_TK), len(ids_TK[0])
    for k in range(K):
        for t in range(T):
            e = ids_TK[t][k]
            if cap is None or len(kept[e]) < cap:
                kept[e].append((t, w_TK[t][k]))
            else:
                dropped.append(t)
    return kept, dropped


def assert_layout(plan, kept, dropped):
    E = plan.num_experts
    for e in range(E):
        rows = (plan.expert_ids_N == e).nonzero().flatten()
        assert plan.token_ids_N[rows].tolist() == [t for t, _ in kept[e]], f"expert {e}"
        torch.testing.assert_close(plan.weights_N[rows].float(), torch.tensor([w for _, w in kept[e]]))
    tail = plan.token_ids_N[plan.expert_ids_N == E]
    assert sorted(tail.tolist()) == sorted(dropped)
    assert int(plan.dropped) == len(dropped)


def assert_invariants(plan: RoutingPlan):
    """Sorted by expert, dropped (id E, weight 0) last, counts agree with the rows."""
    E, N = plan.num_experts, plan.num_assignments
    exp = plan.expert_ids_N
    assert exp.shape == plan.token_ids_N.shape == plan.weights_N.shape == (N,)
    assert bool((exp[1:] >= exp[:-1]).all()), "not sorted by expert"
    kept = exp < E
    assert torch.equal(plan.tokens_per_expert_E, torch.bincount(exp[kept], minlength=E))
    assert int(plan.tokens_per_expert_E.sum()) + int(plan.dropped) == N
    assert bool((plan.weights_N[~kept] == 0).all())
    assert bool(((plan.token_ids_N >= 0) & (plan.token_ids_N < plan.num_tokens)).all())


# ---------------------------------------------------------------- gshard / Switch


def ref_gshard(logits, K, normalize=True):
    ids, ws = [], []
    for row in logits:
        p = softmax_row(row)
        top = topk_row(p, K)
        w = [p[e] for e in top]
        if normalize and K > 1:
            w = [v / sum(w) for v in w]
        ids.append(top)
        ws.append(w)
    return ids, ws


def ref_switch_loss(logits, ids, E, K):
    T = len(logits)
    probs = [softmax_row(r) for r in logits]
    f = [sum(row.count(e) for row in ids) / (T * K) for e in range(E)]
    P = [sum(p[e] for p in probs) / T for e in range(E)]
    return E * sum(fi * pi for fi, pi in zip(f, P))


def ref_z_loss(logits):
    return sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(logits)


@pytest.mark.parametrize("K", [1, 2])
def test_gshard_matches_reference(K):
    r = make("gshard", top_k=K, aux_loss_coef=0.1, z_loss_coef=0.01)
    logits = torch.randn(6, 4)
    plan = r(dictate(r, logits), 6)
    ids, ws = ref_gshard(logits.tolist(), K)
    assert_layout(plan, *ref_layout(ids, ws, 4, None))
    assert plan.aux_losses["load_balance"].item() == pytest.approx(0.1 * ref_switch_loss(logits.tolist(), ids, 4, K))
    assert plan.aux_losses["z_loss"].item() == pytest.approx(0.01 * ref_z_loss(logits.tolist()), rel=1e-5)
    assert_invariants(plan)


def test_switch_loss_closed_form():
    # Each expert gets exactly T/E tokens -> f = 1/E -> loss = sum_e P_e = 1, whatever the probs.
    r = make("gshard", top_k=1, aux_loss_coef=0.05)
    logits = torch.tensor([[3.0, 0, 0, 1], [0, 2.0, 0, 0], [0, 1, 4.0, 0], [0, 0, 0, 5.0]])
    plan = r(dictate(r, logits), 4)
    assert plan.tokens_per_expert_E.tolist() == [1, 1, 1, 1]
    assert plan.aux_losses["load_balance"].item() == pytest.approx(0.05)
    # Uniform probabilities (zero logits) also give exactly 1, whatever the ties picked.
    plan = r(dictate(r, torch.zeros(4, 4)), 4)
    assert plan.aux_losses["load_balance"].item() == pytest.approx(0.05)
    # All tokens on expert 0: loss = E * P_0.
    logits = torch.tensor([[5.0, 0, 0, 0]] * 4)
    plan = r(dictate(r, logits), 4)
    assert plan.aux_losses["load_balance"].item() == pytest.approx(0.05 * 4 * softmax_row([5.0, 0, 0, 0])[0])


def test_gshard_noise_only_in_training_and_z_loss_on_clean_logits():
    r = make("gshard", top_k=2, noise_std=1.0, z_loss_coef=1.0)
    logits = torch.randn(6, 4)
    x = dictate(r, logits)
    a, b = r(x, 6), r(x, 6)
    assert not torch.equal(a.probs_TE, b.probs_TE)  # noisy in training
    assert a.aux_losses["z_loss"].item() == pytest.approx(ref_z_loss(logits.tolist()), rel=1e-5)
    r.eval()
    torch.testing.assert_close(r(x, 6).probs_TE, logits.softmax(-1))


def test_capacity_hand_worked():
    # Tokens 0-2 prefer expert 0, token 3 prefers expert 1; E=2, K=2, capacity ceil(0.5*4*2/2)=2.
    # First choices: e0 <- t0, t1 (t2 dropped); e1 <- t3. Second choices: e1 <- t0 (t1, t2
    # dropped: full); e0 <- t3 dropped (full).
    r = make("gshard", E=2, top_k=2, capacity_factor=0.5, aux_loss_coef=0.0)
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    plan = r(dictate(r, logits), 4)
    assert plan.token_ids_N.tolist() == [0, 1, 3, 0, 2, 3, 1, 2]
    assert plan.expert_ids_N.tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    assert plan.tokens_per_expert_E.tolist() == [2, 2]
    assert int(plan.dropped) == 4
    assert plan.weights_N[4:].tolist() == [0, 0, 0, 0]
    assert_invariants(plan)


@pytest.mark.parametrize("name", ["gshard", "sigmoid", "xmoe", "deepseek"])
def test_capacity_matches_reference(name):
    T, E, K = 12, 4, 2
    r = make(name, E=E, D=5, top_k=K, capacity_factor=0.75)
    x = torch.randn(T, 5)
    plan = r(x, T)
    cap = expert_capacity(T, K, E, 0.75)
    assert cap == 5  # 24 assignments, room for 20: at least 4 dropped
    kept, dropped = ref_layout(*_choices(name, r, x, K), E, cap)
    assert len(dropped) >= 4
    assert_layout(plan, kept, dropped)
    assert_invariants(plan)


def _choices(name, r, x, K):
    """(ids_TK, w_TK) of a token-choice router, from the references (lists)."""
    with torch.no_grad():
        if name == "xmoe":
            return ref_gshard(ref_xmoe_logits(x, r), K)
        rows = (x @ r.proj.weight.t()).tolist()
    if name == "gshard":
        return ref_gshard(rows, K)
    if name == "sigmoid":
        return ref_sigmoid(rows, K)
    return ref_deepseek(rows, r.expert_bias.tolist(), K, r.cfg.num_groups, r.cfg.topk_groups)


def test_expert_capacity_rounding():
    assert expert_capacity(10, 1, 1, 1.1) == 11  # float 1.1*10 = 11.000000000000002
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(9, 1, 4, 1.0) == 3
    assert expert_capacity(1, 1, 8, 0.1) == 1


# ---------------------------------------------------------------- sigmoid


def ref_sigmoid(logits, K, normalize=True):
    ids, ws = [], []
    for row in logits:
        s = [sigmoid(v) for v in row]
        top = topk_row(s, K)
        w = [s[e] for e in top]
        if normalize and K > 1:
            w = [v / sum(w) for v in w]
        ids.append(top)
        ws.append(w)
    return ids, ws


@pytest.mark.parametrize("K,normalize", [(1, True), (2, True), (2, False)])
def test_sigmoid_matches_reference(K, normalize):
    r = make("sigmoid", top_k=K, normalize_weights=normalize, aux_loss_coef=0.1)
    logits = torch.randn(6, 4)
    plan = r(dictate(r, logits), 6)
    ids, ws = ref_sigmoid(logits.tolist(), K, normalize)
    assert_layout(plan, *ref_layout(ids, ws, 4, None))
    # Load-balancing loss on the per-token normalised sigmoid scores.
    s = [[sigmoid(v) for v in row] for row in logits.tolist()]
    P = [sum(row[e] / sum(row) for row in s) / 6 for e in range(4)]
    f = [sum(row.count(e) for row in ids) / (6 * K) for e in range(4)]
    assert plan.aux_losses["load_balance"].item() == pytest.approx(0.1 * 4 * sum(a * b for a, b in zip(f, P)))
    assert "z_loss" not in plan.aux_losses
    assert_invariants(plan)


# ---------------------------------------------------------------- X-MoE


def ref_xmoe_logits(x, r):
    """cos(x P^T, e) / tau with tau = 1 / exp(log_inv_temp) clamped at 0.01, by hand."""
    P, emb = r.proj.weight.tolist(), r.expert_emb_ER.tolist()
    inv_t = min(math.exp(r.log_inv_temp.item()), 100.0)
    out = []
    for xt in x.tolist():
        z = [sum(p_i * x_i for p_i, x_i in zip(prow, xt)) for prow in P]
        zn = math.sqrt(sum(v * v for v in z))
        row = []
        for e in emb:
            en = math.sqrt(sum(v * v for v in e))
            row.append(sum(a * b for a, b in zip(z, e)) / (zn * en) * inv_t)
        out.append(row)
    return out


def test_xmoe_matches_reference():
    r = make("xmoe", D=6, top_k=2, xmoe_dim=3, aux_loss_coef=0.1, z_loss_coef=0.01)
    assert r.expert_emb_ER.shape == (4, 3) and r.proj.weight.shape == (3, 6)
    assert math.exp(r.log_inv_temp.item()) == pytest.approx(1 / 0.07)
    x = torch.randn(7, 6)
    plan = r(x, 7)
    logits = ref_xmoe_logits(x, r)
    assert max(abs(v) for row in logits for v in row) <= 1 / 0.07 + 1e-4  # cosine / tau
    ids, ws = ref_gshard(logits, 2)
    assert_layout(plan, *ref_layout(ids, ws, 4, None))
    assert plan.aux_losses["load_balance"].item() == pytest.approx(0.1 * ref_switch_loss(logits, ids, 4, 2), rel=1e-5)
    assert plan.aux_losses["z_loss"].item() == pytest.approx(0.01 * ref_z_loss(logits), rel=1e-4)
    assert_invariants(plan)


def test_xmoe_temperature_is_learnable_and_clamped():
    r = make("xmoe", D=6, top_k=1, xmoe_dim=3)
    plan = r(torch.randn(5, 6), 5)
    (plan.weights_N.sum() + plan.aux_loss()).backward()
    assert r.log_inv_temp.grad is not None and r.log_inv_temp.grad.abs().item() > 0
    with torch.no_grad():
        r.log_inv_temp.fill_(math.log(1e4))  # tau = 1e-4 asked for, clamped at 0.01
    assert r.inv_temperature().item() == pytest.approx(100.0)
    assert r.logits(torch.randn(5, 6)).abs().max().item() <= 100.0 + 1e-3


# ---------------------------------------------------------------- SoftMoE


def ref_soft(x_TD, r, B, L):
    """Slot logits, dispatch (softmax over L) and combine (softmax over X) with loops."""
    phi = r.phi_DX.t().tolist()  # X rows of length D
    scale = r.scale.item()
    X = len(phi)
    xs = x_TD.tolist()
    norm = lambda v: [a / math.sqrt(sum(b * b for b in v)) for a in v]  # noqa: E731
    logits = [[[scale * sum(a * b for a, b in zip(norm(xs[b * L + l]), norm(phi[j]))) for j in range(X)]
               for l in range(L)] for b in range(B)]
    dispatch = [[[0.0] * X for _ in range(L)] for _ in range(B)]
    for b in range(B):
        for j in range(X):
            col = softmax_row([logits[b][l][j] for l in range(L)])
            for l in range(L):
                dispatch[b][l][j] = col[l]
    combine = [[softmax_row(logits[b][l]) for l in range(L)] for b in range(B)]
    return torch.tensor(logits), torch.tensor(dispatch), torch.tensor(combine)


def test_softmoe_dispatch_combine_and_layout():
    B, L, E, S, D = 2, 3, 3, 2, 5
    r = make("softmoe", E=E, D=D, slots_per_expert=S, z_loss_coef=0.01)
    with torch.no_grad():
        r.scale.fill_(2.5)
    x = torch.randn(B * L, D)
    plan = r(x, L)
    logits, dispatch, combine = ref_soft(x, r, B, L)
    torch.testing.assert_close(plan.soft.dispatch_BLX, dispatch)
    torch.testing.assert_close(plan.soft.combine_BLX, combine)
    torch.testing.assert_close(plan.soft.dispatch_BLX.sum(1), torch.ones(B, E * S))  # each slot: convex mix
    torch.testing.assert_close(plan.soft.combine_BLX.sum(2), torch.ones(B, L))  # each token: convex mix
    assert plan.aux_losses["z_loss"].item() == pytest.approx(0.01 * ref_z_loss(logits.view(B * L, -1).tolist()),
                                                             rel=1e-5)
    # Slot rows, expert-major: row e*(B*S) + b*S + s.
    N = E * B * S
    assert plan.num_assignments == N
    assert plan.tokens_per_expert_E.tolist() == [B * S] * E
    assert plan.expert_ids_N.tolist() == [e for e in range(E) for _ in range(B * S)]
    assert plan.token_ids_N.tolist() == [n % (B * L) for n in range(N)]
    assert int(plan.dropped) == 0
    assert_invariants(plan)
    assert ROUTERS["softmoe"].order == "soft" and not ROUTERS["softmoe"].causal


def test_soft_order_matches_loops():
    B, L, E, S, D = 2, 3, 2, 2, 4
    r = make("softmoe", E=E, D=D, slots_per_expert=S)
    x = torch.randn(B * L, D)
    plan = r(x, L)
    dsp, cmb = plan.soft.dispatch_BLX, plan.soft.combine_BLX
    slots = SoftOrder().permute(x, plan)
    for e in range(E):
        for b in range(B):
            for s in range(S):
                want = sum(dsp[b, l, e * S + s] * x[b * L + l] for l in range(L))
                torch.testing.assert_close(slots[e * B * S + b * S + s], want)
    y_ND = torch.randn(E * B * S, D)
    y = SoftOrder().unpermute(y_ND, plan)
    for b in range(B):
        for l in range(L):
            want = sum(cmb[b, l, e * S + s] * y_ND[e * B * S + b * S + s] for e in range(E) for s in range(S))
            torch.testing.assert_close(y[b * L + l], want)


def test_softmoe_layer_forward_backward():
    cfg = MoEConfig(num_experts=3, router=RouterConfig(name="softmoe", slots_per_expert=2))
    cfg.validate()
    layer = MoELayer(cfg, 8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y, stats = layer(x)
    assert y.shape == x.shape and stats.num_assignments == 3 * 2 * 2
    y.square().sum().backward()
    for p in (x, layer.router.phi_DX, layer.router.scale, layer.experts.w1_EDF):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_noncausal_routers_need_opt_in():
    for name in ("softmoe", "expert_choice"):
        with pytest.raises(ConfigError, match="allow_noncausal"):
            ModelConfig(moe=MoEConfig(num_experts=4, router=RouterConfig(name=name))).validate()
        ModelConfig(moe=MoEConfig(num_experts=4, router=RouterConfig(name=name, allow_noncausal=True))).validate()


# ---------------------------------------------------------------- Expert-Choice


def ref_expert_choice(logits, C):
    """Each expert: the C tokens with the highest softmax score, best first."""
    probs = [softmax_row(r) for r in logits]
    T, E = len(probs), len(probs[0])
    return {e: [(t, probs[t][e]) for t in sorted(range(T), key=lambda t: (-probs[t][e], t))[:C]] for e in range(E)}


@pytest.mark.parametrize("T,K,factor,C", [(6, 2, 1.0, 3), (6, 1, 1.0, 2), (6, 2, 10.0, 6), (6, 1, 0.01, 1)])
def test_expert_choice_matches_reference(T, K, factor, C):
    r = make("expert_choice", top_k=K, ec_capacity_factor=factor, z_loss_coef=0.01)
    logits = torch.randn(T, 4)
    plan = r(dictate(r, logits), T)
    assert plan.tokens_per_expert_E.tolist() == [C] * 4
    assert_layout(plan, ref_expert_choice(logits.tolist(), C), [])
    assert set(plan.aux_losses) == {"z_loss"}
    assert plan.aux_losses["z_loss"].item() == pytest.approx(0.01 * ref_z_loss(logits.tolist()), rel=1e-5)
    assert_invariants(plan)
    assert not ROUTERS["expert_choice"].causal


def test_expert_choice_routes_over_the_whole_batch():
    # Expert 0 loves the tokens of sequence 1 only: with C = T*K/E = 2 it takes two of them and
    # none of sequence 0 (no per-sequence quota).
    r = make("expert_choice", E=2, top_k=1)
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [3.0, 0.0], [2.0, 0.0]])
    plan = r(dictate(r, logits), 2)
    assert plan.token_ids_N[plan.expert_ids_N == 0].tolist() == [2, 3]


# ---------------------------------------------------------------- DeepSeek-V3


def ref_deepseek(logits, bias, K, G, topk_groups, scaling=1.0):
    ids, ws = [], []
    E = len(bias)
    M = E // G
    for row in logits:
        s = [sigmoid(v) for v in row]
        biased = [a + b for a, b in zip(s, bias)]
        if G > 1:
            gscore = [sum(sorted(biased[g * M:(g + 1) * M], reverse=True)[:min(2, M)]) for g in range(G)]
            keep = set(topk_row(gscore, topk_groups))
            biased = [v if e // M in keep else -math.inf for e, v in enumerate(biased)]
        top = topk_row(biased, K)
        w = [s[e] for e in top]
        w = [v / sum(w) * scaling for v in w] if K > 1 else [v * scaling for v in w]
        ids.append(top)
        ws.append(w)
    return ids, ws


def logit(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize("G,topk_groups,K", [(1, 1, 2), (2, 1, 2), (4, 2, 3), (2, 2, 1)])
def test_deepseek_matches_reference(G, topk_groups, K):
    r = make("deepseek", E=8, top_k=K, num_groups=G, topk_groups=topk_groups, routed_scaling=2.5)
    with torch.no_grad():
        r.expert_bias.copy_(torch.randn(8) * 0.1)
    logits = torch.randn(8, 8)
    plan = r(dictate(r, logits), 8)
    ids, ws = ref_deepseek(logits.tolist(), r.expert_bias.tolist(), K, G, topk_groups, 2.5)
    assert_layout(plan, *ref_layout(ids, ws, 8, None))
    assert_invariants(plan)


def test_deepseek_group_limited_mask():
    # Groups {0,1} and {2,3}. Expert 0 is the single best, but group 1 has the larger top-2 sum
    # (0.6+0.6 > 0.9+0.1), so with one group allowed the token takes experts 2 and 3.
    r = make("deepseek", E=4, top_k=2, num_groups=2, topk_groups=1)
    logits = torch.tensor([[logit(0.9), logit(0.1), logit(0.6), logit(0.6)]])
    plan = r(dictate(r, logits), 1)
    assert sorted(plan.expert_ids_N.tolist()) == [2, 3]
    torch.testing.assert_close(plan.weights_N, torch.tensor([0.5, 0.5]))
    # Without group limits expert 0 wins.
    r = make("deepseek", E=4, top_k=2)
    plan = r(dictate(r, logits), 1)
    assert sorted(plan.expert_ids_N.tolist()) == [0, 2]


def test_deepseek_bias_changes_selection_not_weights():
    r = make("deepseek", E=4, top_k=2)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [1.0, 2.0, 0.0, -1.0]])
    x = dictate(r, logits)
    s = torch.sigmoid(logits)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 now always chosen
    plan = r(x, 2)
    for t in range(2):
        rows = plan.token_ids_N == t
        chosen = plan.expert_ids_N[rows]
        assert 3 in chosen.tolist()
        want = s[t, chosen] / s[t, chosen].sum()  # unbiased scores, normalised
        torch.testing.assert_close(plan.weights_N[rows], want)
    assert not r.expert_bias.requires_grad and "expert_bias" in dict(r.named_buffers())
    assert "expert_bias" in r.state_dict()


def test_deepseek_bias_update_sign_rule_and_accumulation():
    r = make("deepseek", E=4, top_k=1, bias_update_rate=0.01)
    x = dictate(r, torch.tensor([[3.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 3.0]]))
    r(x, 4)  # loads [2, 1, 0, 1]
    r(x[:1], 1)  # + [1, 0, 0, 0] -> [3, 1, 0, 1], mean 1.25
    assert r.load_acc_E.tolist() == [3, 1, 0, 1]
    r.eval()
    r(x, 4)  # eval forwards do not count
    assert r.load_acc_E.tolist() == [3, 1, 0, 1]
    r.after_step()
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert r.load_acc_E is None
    r.after_step()  # nothing seen: no change
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_deepseek_balance_group_reduces_loads(monkeypatch):
    r = make("deepseek", E=4, top_k=1, bias_update_rate=0.1)
    group = object()
    seen = []

    def fake_all_reduce(t, op=None, group=None):  # another rank sent 10 tokens to expert 2
        seen.append(group)
        t += torch.tensor([0.0, 0.0, 10.0, 0.0])

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    r.balance_group = group
    r(dictate(r, torch.tensor([[3.0, 0, 0, 0]] * 4)), 4)  # local loads [4, 0, 0, 0]
    r.after_step()  # global [4, 0, 10, 0], mean 3.5
    assert seen == [group]
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, -0.1, 0.1]))


def test_deepseek_sequence_aux_loss():
    B, L, E, K = 2, 3, 4, 2
    r = make("deepseek", E=E, top_k=K, seq_aux_coef=0.3)
    logits = torch.randn(B * L, E)
    plan = r(dictate(r, logits), L)
    ids, _ = ref_deepseek(logits.tolist(), [0.0] * E, K, 1, 1)
    s = [[sigmoid(v) for v in row] for row in logits.tolist()]
    want = 0
    for b in range(B):
        rows = range(b * L, (b + 1) * L)
        f = [E / (K * L) * sum(ids[t].count(i) for t in rows) for i in range(E)]
        P = [sum(s[t][i] / sum(s[t]) for t in rows) / L for i in range(E)]
        want += 0.3 * sum(a * c for a, c in zip(f, P)) / B
    assert plan.aux_losses["seq_balance"].item() == pytest.approx(want, rel=1e-5)
    # Closed form: flat scores (all logits 0) give P_i = 1/E, so the loss is exactly alpha.
    plan = r(dictate(r, torch.zeros(B * L, E)), L)
    assert plan.aux_losses["seq_balance"].item() == pytest.approx(0.3)
    # Off by default.
    assert make("deepseek", E=E, top_k=K)(torch.randn(4, 6), 2).aux_losses == {}


# ---------------------------------------------------------------- every router


def every_router_cfg(name):
    kw = {"E": 4, "D": 8, "z_loss_coef": 0.01 if name in ("gshard", "xmoe", "softmoe", "expert_choice") else 0.0}
    if name == "deepseek":
        kw.update(num_groups=2, topk_groups=1, seq_aux_coef=0.01)
    return kw


@pytest.mark.parametrize("name", ALL)
def test_registered_and_plan_invariants(name):
    assert name in ROUTERS
    r = make(name, **every_router_cfg(name))
    plan = r(torch.randn(2 * 5, 8), 5)
    assert_invariants(plan)
    assert plan.num_tokens == 10 and plan.num_experts == 4
    assert plan.weights_N.dtype == torch.float32 and plan.probs_TE.shape == (10, 4)
    if name in ("gshard", "sigmoid", "xmoe", "deepseek"):
        capped = make(name, capacity_factor=0.5, **every_router_cfg(name))(torch.randn(10, 8), 5)
        assert_invariants(capped)
        assert int(capped.dropped) > 0


@pytest.mark.parametrize("name", ALL)
def test_layer_forward_backward_every_router(name):
    kw = every_router_cfg(name)
    kw.pop("E"), kw.pop("D")
    cfg = MoEConfig(num_experts=4, router=RouterConfig(name=name, **kw))
    cfg.validate()
    layer = MoELayer(cfg, 8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y, stats = layer(x)
    (y.square().sum() + stats.aux_loss).backward()
    grads = [p.grad for p in layer.router.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    layer.router.after_step()


@pytest.mark.parametrize("name,kw,field", [
    ("gshard", {"top_k": 5}, "top_k"),
    ("gshard", {"capacity_factor": 0.0}, "capacity_factor"),
    ("sigmoid", {"z_loss_coef": 0.1}, "z_loss_coef"),
    ("sigmoid", {"noise_std": 0.5}, "noise_std"),
    ("xmoe", {"xmoe_temperature": 0.001}, "xmoe_temperature"),
    ("xmoe", {"xmoe_dim": 2.5}, "xmoe_dim"),
    ("softmoe", {"slots_per_expert": 1.5}, "slots_per_expert"),
    ("softmoe", {"capacity_factor": 1.0}, "capacity_factor"),
    ("expert_choice", {"ec_capacity_factor": 0.0}, "ec_capacity_factor"),
    ("expert_choice", {"capacity_factor": 1.25}, "capacity_factor"),
    ("deepseek", {"num_groups": 3}, "num_groups"),  # does not divide E=4
    ("deepseek", {"num_groups": 2, "topk_groups": 3}, "topk_groups"),
    ("deepseek", {"num_groups": 4, "topk_groups": 1, "top_k": 2}, "top_k"),  # 1 group of 1 expert
    ("deepseek", {"z_loss_coef": 0.1}, "z_loss_coef"),
    ("deepseek", {"routed_scaling": 0.0}, "routed_scaling"),
    ("nope", {}, "name"),
])
def test_invalid_options_raise(name, kw, field):
    with pytest.raises(ConfigError) as err:
        RouterConfig(name=name, **kw).validate(4)
    assert err.value.field_name == f"router.{field}"


# ---------------------------------------------------------------- adding a router


TINY_ROUTER = '''
"""A router written in one file, for the registry test."""
import torch
from torch import nn

from fsmoe.routing import register_router
from fsmoe.routing.base import Router
from fsmoe.routing.plan import RoutingPlan
from fsmoe.config import ConfigError


@register_router("first_expert_test")
class FirstExpertRouter(Router):
    """Every token to expert 0 with weight sigmoid(w)."""

    def __init__(self, cfg, d_model, num_experts):
        super().__init__(cfg, d_model, num_experts)
        self.w = nn.Parameter(torch.zeros(()))

    @classmethod
    def check_config(cls, cfg, num_experts, prefix):
        if cfg.top_k != 1:
            raise ConfigError(f"{prefix}.top_k", cfg.top_k, "must be 1")

    def forward(self, x_TD, seq_len):
        T = x_TD.shape[0]
        ids = torch.zeros(T, 1, dtype=torch.int64)
        return RoutingPlan.from_topk(ids, torch.sigmoid(self.w).expand(T, 1), self.num_experts)
'''


def test_new_router_is_one_file_plus_registry_entry(tmp_path, monkeypatch):
    # The file goes where the package looks for routers; importing "fsmoe.routing.<module>" is
    # exactly what a new _ROUTER_MODULES entry does.
    (tmp_path / "first_expert_test.py").write_text(textwrap.dedent(TINY_ROUTER))
    monkeypatch.setattr(fsmoe.routing, "__path__", [*fsmoe.routing.__path__, str(tmp_path)])
    monkeypatch.setattr(fsmoe.routing, "_ROUTER_MODULES", [*fsmoe.routing._ROUTER_MODULES, "first_expert_test"])
    monkeypatch.delitem(fsmoe.routing.ROUTERS, "first_expert_test", raising=False)
    try:
        for m in fsmoe.routing._ROUTER_MODULES:
            __import__(f"fsmoe.routing.{m}")
        with pytest.raises(ConfigError, match="top_k"):
            MoEConfig(num_experts=4, router=RouterConfig(name="first_expert_test", top_k=2)).validate()
        cfg = MoEConfig(num_experts=4, router=RouterConfig(name="first_expert_test", top_k=1))
        cfg.validate()
        layer = MoELayer(cfg, 8)
        y, stats = layer(torch.randn(3, 8))
        assert stats.tokens_per_expert.tolist() == [3, 0, 0, 0]
        y.sum().backward()
        assert layer.router.w.grad is not None
    finally:
        fsmoe.routing.ROUTERS.pop("first_expert_test", None)
        sys.modules.pop("fsmoe.routing.first_expert_test", None)


def test_soft_order_takes_non_contiguous_rows():
    # Hooks may hand the Order a strided view; IndexOrder copes, so must SoftOrder.
    r = make("softmoe", E=2, D=4, slots_per_expert=2)
    x = torch.randn(6, 4)
    plan = r(x, 3)
    x_strided = x.t().contiguous().t()
    assert not x_strided.is_contiguous()
    torch.testing.assert_close(SoftOrder().permute(x_strided, plan), SoftOrder().permute(x, plan))
    y = torch.randn(4, 8)  # N = E*B*S = 8 rows of width 4, stored transposed
    torch.testing.assert_close(SoftOrder().unpermute(y.t(), plan), SoftOrder().unpermute(y.t().contiguous(), plan))
