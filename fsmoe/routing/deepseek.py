"""DeepSeek-V3 router: sigmoid scores, group-limited top-k, aux-loss-free bias balancing.

Shape legend: T tokens, D model dim, E experts, K experts per token, G expert groups,
M = E/G experts per group, B sequences, L sequence length (T = B*L).

Forward (DeepSeek-V3 report, §2.1.2)::

    scores_TE = sigmoid(x W)
    biased_TE = scores_TE + expert_bias            # used only to *select* experts
    group score = sum of the top-2 biased scores of each group; keep the best ``topk_groups``
    groups, mask the rest, take the top-K experts of what is left
    weights   = unbiased scores of the chosen experts / their sum * routed_scaling

Aux-loss-free balancing: in training, each forward adds its per-expert token counts to an
accumulator; ``after_step()`` (called by the trainer after the optimizer step) sums them over
``balance_group`` if one is set, then moves ``expert_bias += bias_update_rate * sign(mean - load)``
(overloaded experts become less attractive) and resets the accumulator. Only the sign of each
expert's deviation matters, so forwards that are replayed (activation recomputation) count twice
for every expert alike and do not change the update.

The optional sequence-wise balance loss (``seq_aux_coef`` = alpha, off by default) is, per
sequence, ``alpha * sum_i f_i P_i`` with ``f_i = E/(K*L) * #tokens choosing i`` and ``P_i`` the
sequence mean of ``s_i / sum_j s_j``; it is averaged over sequences. ``aux_loss_coef`` (the
batch-wise Switch loss) is ignored: this router balances with the bias instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fsmoe.config import ConfigError
from fsmoe.recompute import recomputing
from fsmoe.routing import register_router
from fsmoe.routing.base import Router, require_unset
from fsmoe.routing.plan import RoutingPlan, count_experts, expert_capacity


def limit_to_groups(biased_TE: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """Mask (-inf) every expert outside each token's ``topk_groups`` best groups.

    biased_TE: [T, E] selection scores. A group's score is the sum of its two best experts
    (one if groups have a single expert). Returns [T, E].
    """
    T, E = biased_TE.shape
    G = num_groups
    biased_TGM = biased_TE.view(T, G, E // G)
    group_TG = biased_TGM.topk(min(2, E // G), dim=-1).values.sum(-1)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_TG.topk(topk_groups, dim=-1).indices, True)
    return biased_TGM.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)


def sequence_balance_loss(scores_TE: Tensor, ids_TK: Tensor, seq_len: int) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss (without alpha), averaged over sequences.

    scores_TE: [T, E] sigmoid scores; ids_TK: [T, K] chosen experts; T = B*seq_len.
    Equals 1 when every sequence spreads its K*L choices evenly and its probabilities are flat.
    """
    T, E = scores_TE.shape
    K, L = ids_TK.shape[1], seq_len
    B = T // L
    probs_BLE = (scores_TE / scores_TE.sum(-1, keepdim=True)).view(B, L, E)
    counts_BE = torch.zeros(B, E, device=scores_TE.device, dtype=scores_TE.dtype)
    counts_BE.scatter_add_(1, ids_TK.reshape(B, L * K), torch.ones(B, L * K, device=scores_TE.device,
                                                                     dtype=scores_TE.dtype))
    f_BE = counts_BE * (E / (K * L))
    return (f_BE * probs_BLE.mean(1)).sum(-1).mean()


@register_router("deepseek")
class DeepSeekRouter(Router):
    """sigmoid scores + bias for selection, group-limited top-k, normalised unbiased weights."""

    def __init__(self, cfg, d_model, num_experts):
        super().__init__(cfg, d_model, num_experts)
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        # A buffer, not a parameter: moved by after_step(), never by the optimizer; checkpointed.
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # Process group over which after_step() sums the loads (set by the distributed setup).
        self.balance_group = None
        # Token counts since the last after_step(). A plain attribute, not a buffer, because DDP
        # broadcasts buffers from rank 0 at every forward, which would overwrite local counts.
        self.load_acc_E: Tensor | None = None

    def reset_buffers(self) -> None:
        """The bias as built (zeros): for a model materialised from the meta device."""
        self.expert_bias.zero_()

    @classmethod
    def check_config(cls, cfg, num_experts, prefix):
        require_unset(cfg, prefix, "deepseek", ("z_loss_coef", "noise_std"))
        reachable = cfg.topk_groups * (num_experts // cfg.num_groups)
        if cfg.top_k > reachable:
            raise ConfigError(f"{prefix}.top_k", cfg.top_k, f"must be <= topk_groups * experts per group = "
                              f"{cfg.topk_groups} * {num_experts // cfg.num_groups} = {reachable}")
        if not cfg.routed_scaling > 0:
            raise ConfigError(f"{prefix}.routed_scaling", cfg.routed_scaling, "must be > 0")

    def select(self, scores_TE: Tensor) -> Tensor:
        """scores_TE: [T, E] -> chosen expert ids [T, K] (biased, group-limited; no gradient)."""
        cfg = self.cfg
        biased_TE = scores_TE.detach() + self.expert_bias.float()
        if cfg.num_groups > 1:
            biased_TE = limit_to_groups(biased_TE, cfg.num_groups, cfg.topk_groups)
        return biased_TE.topk(cfg.top_k, dim=-1).indices

    def forward(self, x_TD: Tensor, seq_len: int) -> RoutingPlan:
        """x_TD: [T, D] (T = B*seq_len when seq_aux_coef > 0) -> plan with N = T*K assignments."""
        cfg, E, K = self.cfg, self.num_experts, self.cfg.top_k
        scores_TE = torch.sigmoid(self.proj(x_TD).float())
        ids_TK = self.select(scores_TE)
        w_TK = scores_TE.gather(1, ids_TK)
        if cfg.normalize_weights and K > 1:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        w_TK = w_TK * cfg.routed_scaling
        counts_E = count_experts(ids_TK, E)
        if self.training and not recomputing():  # once per step, also under activation checkpointing
            self.accumulate_load(counts_E)
        losses: dict[str, Tensor] = {}
        if cfg.seq_aux_coef > 0 and torch.is_grad_enabled():
            if seq_len < 1 or x_TD.shape[0] % seq_len:
                raise ValueError(f"deepseek: {x_TD.shape[0]} tokens are not whole sequences of length {seq_len}")
            losses["seq_balance"] = cfg.seq_aux_coef * sequence_balance_loss(scores_TE, ids_TK, seq_len)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        cap = None if cfg.capacity_factor is None else expert_capacity(x_TD.shape[0], K, E, cfg.capacity_factor)
        return RoutingPlan.from_topk(ids_TK, w_TK.to(x_TD.dtype), E, cap, aux_losses=losses, probs_TE=probs_TE)

    # ------------------------------------------------------------------ aux-loss-free balancing
    def accumulate_load(self, counts_E: Tensor) -> None:
        """Add one forward's token counts [E] (before capacity drops) to the accumulator."""
        counts_E = counts_E.detach()
        self.load_acc_E = counts_E.clone() if self.load_acc_E is None else self.load_acc_E + counts_E

    @torch.no_grad()
    def after_step(self) -> None:
        """Bias update from the loads since the last step, then reset. Collective over
        ``balance_group`` when set (every rank of it must call this, even with no forward)."""
        load_E = (self.load_acc_E if self.load_acc_E is not None
                  else torch.zeros(self.num_experts, dtype=torch.int64, device=self.expert_bias.device))
        load_E = load_E.to(device=self.expert_bias.device, dtype=torch.float32)
        if self.balance_group is not None:
            dist.all_reduce(load_E, op=dist.ReduceOp.SUM, group=self.balance_group)
        self.expert_bias += (self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)).to(self.expert_bias.dtype)
        self.load_acc_E = None
