"""Autoregressive generation: prefill the prompts, then decode one token per step.

Shape legend: B prompts, P longest prompt, S = P + new tokens (cache slots), V vocabulary.

1. left-pad the prompts to P (fsmoe.models.kv_cache: padding slots are masked out and every row's
   RoPE positions start at 0 at its first real token);
2. prefill: one forward over [B, P] fills the KV cache and gives the first new token's logits;
3. decode: each step feeds the B tokens just chosen at slot P + t and reads the next logits
   (on CUDA, given ``DecodeGraphs``, replayed from CUDA graphs: fsmoe.infer.decode_graph).
   Without the cache (``use_cache=False``) every step runs the whole sequence again: the same
   numbers, for checking the cache;
4. choose: greedy (temperature 0), or sample from softmax(logits / temperature) restricted to the
   smallest set of tokens whose probability reaches ``top_p``. A row stops at an end-of-sequence id.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fsmoe.infer.decode_graph import DecodeGraphs
from fsmoe.models.kv_cache import KVCache


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass (1 = the whole distribution)
    seed: int = 0
    use_cache: bool = True
    eos_ids: frozenset[int] = frozenset()  # a row stops after emitting one of these


@dataclass(frozen=True)
class Generation:
    new_tokens: list[list[int]]  # per prompt, the generated ids (up to and including an end-of-sequence id)
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    graphed: bool = False  # decode steps were replayed from CUDA graphs

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens (every row, after the first) per second of decoding."""
        n = sum(max(len(t) - 1, 0) for t in self.new_tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def choose(logits_BV: Tensor, s: Sampling, generator: torch.Generator | None) -> Tensor:
    """Next ids [B] from the last position's logits [B, V]."""
    if s.temperature == 0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV.float() / s.temperature, dim=-1)
    if s.top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(-1) - sorted_BV  # mass of the tokens ranked above each one
        sorted_BV = sorted_BV.masked_fill(before_BV >= s.top_p, 0.0)  # the best token is always kept
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], s: Sampling, graphs: DecodeGraphs | None = None
             ) -> Generation:
    """Continue each prompt (a list of token ids) with up to ``s.max_new_tokens`` tokens.
    ``graphs`` (CUDA, with the cache): decode steps replayed from CUDA graphs kept across calls
    (fsmoe.infer.decode_graph); the prefill stays eager."""
    model.eval()
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    runner = (graphs.runner(B, P + s.max_new_tokens)
              if graphs is not None and s.use_cache and device.type == "cuda" else None)
    pad_B = torch.tensor([P - len(p) for p in prompts], device=device)
    idx_BS = torch.zeros(B, P + s.max_new_tokens, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx_BS[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(s.seed) if s.temperature > 0 else None
    cache = runner.cache if runner is not None else (
        KVCache.for_model(model, B, P + s.max_new_tokens) if s.use_cache else None)
    eos = torch.tensor(sorted(s.eos_ids), dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    t0 = time.perf_counter()
    logits_BV = model(idx_BS[:, :P], cache=cache, start=0, pad_B=pad_B).logits[:, -1]
    if device.type == "cuda":  # the prefill's queued GPU work is the prefill's, not the first decode step's
        torch.cuda.synchronize(device)
    prefill_s = time.perf_counter() - t0
    steps = 0
    for t in range(s.max_new_tokens):
        next_B = choose(logits_BV, s, generator)
        idx_BS[:, P + t] = next_B
        steps = t + 1
        done_B |= torch.isin(next_B, eos)
        if bool(done_B.all()) or t + 1 == s.max_new_tokens:
            break
        if runner is not None:
            logits_BV = runner.step(idx_BS[:, P + t:P + t + 1], P + t, pad_B)
        elif cache is not None:
            logits_BV = model(idx_BS[:, P + t:P + t + 1], cache=cache, start=P + t, pad_B=pad_B).logits[:, -1]
        else:
            logits_BV = model(idx_BS[:, :P + t + 1], pad_B=pad_B).logits[:, -1]
    decode_s = time.perf_counter() - t0 - prefill_s
    return Generation([_until_eos(row, s.eos_ids) for row in idx_BS[:, P:P + steps].tolist()],
                      sum(len(p) for p in prompts), prefill_s, decode_s, runner is not None and runner.captured)


def _until_eos(ids: list[int], eos_ids: frozenset[int]) -> list[int]:
    for k, i in enumerate(ids):
        if i in eos_ids:
            return ids[:k + 1]
    return ids
