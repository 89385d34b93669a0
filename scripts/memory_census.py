"""What autograd keeps for backward, block by block, in the trainer's forward (device tool).

For each preset given (cut with --set overrides), builds the model on the device, runs one
forward + loss under the trainer's autocast with saved-tensor hooks, and writes every saved
tensor (shape, dtype, bytes; parameters and repeated storages left out) per block into JSON,
with the peak memory of the same forward + backward. ``fsmoe plan --memory``'s activation terms
are checked against these lists (docs/memory.md).

    python scripts/memory_census.py OUT.json --batch 1 --seq-len 1024 \\
        --case gpt2-xl-moe model.n_layers=2 --case mixtral-8x7b model.n_layers=2
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json

import torch
import torch.nn.functional as F

from fsmoe.config import load_config
from fsmoe.memory import saved_tensor_census
from fsmoe.models import build_model
from fsmoe.recompute import configure_recompute


def one(case: list[str], batch: int, seq_len: int, device: torch.device) -> dict:
    name, overrides = case[0], case[1:]
    cfg = load_config(name, [f"train.seq_len={seq_len}", *overrides])
    with torch.device(device):
        model = build_model(cfg.model, seed=0)
    configure_recompute(model, cfg.train.activation_checkpointing)
    autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
                if cfg.train.dtype == "bfloat16" and device.type == "cuda" else contextlib.nullcontext)
    idx = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), device=device)

    def loss_fn():
        with autocast():
            out = model(idx)
            return F.cross_entropy(out.logits.float().flatten(0, 1), idx.flatten()) + out.aux_loss.float()

    blocks = saved_tensor_census(model, loss_fn)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss_fn().backward()
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    return {"case": case, "batch": batch, "seq_len": seq_len, "blocks": blocks, "fwd_bwd_peak_above_weights": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--case", nargs="+", action="append", required=True, metavar="PRESET [KEY=VALUE ...]")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for case in args.case:
        results.append(one(case, args.batch, args.seq_len, device))
        print(case, {k: sum(t["bytes"] for t in v) for k, v in results[-1]["blocks"].items()},
              "peak", results[-1]["fwd_bwd_peak_above_weights"], flush=True)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
