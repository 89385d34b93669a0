"""``fsmoe generate``: continue prompts with a trained or converted model (KV cache, greedy or sampled)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console

from fsmoe.config import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fsmoe generate`` (see fsmoe.cli)."""
    p = subparsers.add_parser("generate", help="generate text from an fsmoe run or a Hugging Face directory",
                              description="Prefill the prompts, then decode with a KV cache (MLA: the "
                                          "compressed latent cache); greedy by default.")
    add_generation_args(p)
    p.set_defaults(func=run)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The model, prompt and sampling options ``fsmoe generate`` and ``fsmoe infer`` share."""
    p.add_argument("model", type=Path, help="fsmoe run directory (newest checkpoint) or Hugging Face directory")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="a prompt as token ids, e.g. '1 15 27' (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow; a check)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="issue every decode step op by op (default on CUDA: each step is replayed from CUDA graphs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError("--prompt-ids", text, "must be integers separated by spaces or commas") from None
    if not ids:
        raise ConfigError("--prompt-ids", text, "must hold at least one token id")
    return ids


def check_args(args: argparse.Namespace) -> None:
    if not args.prompt and not args.prompt_ids:
        raise ConfigError("--prompt", None, "give at least one --prompt TEXT or --prompt-ids IDS")
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", args.max_new_tokens, "must be >= 1")
    if not 0 <= args.temperature < float("inf"):
        raise ConfigError("--temperature", args.temperature, "must be a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise ConfigError("--top-p", args.top_p, "must be in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", args.device, "no CUDA device is visible; use cpu or auto")


def pick_device(args: argparse.Namespace) -> torch.device:
    """--device auto|cpu|cuda (check_args has refused cuda where none is visible)."""
    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def encode_prompts(args: argparse.Namespace, cfg, converted: bool):
    """(tokenizer, prompts as id lists), every id checked against the model's vocabulary and length."""
    from fsmoe.infer.tokenizer import ByteTokenizer, eos_ids, load_tokenizer

    id_prompts = [_ids(t) for t in args.prompt_ids]
    tok = load_tokenizer(args.model, cfg.vocab_size, converted) if args.prompt else ByteTokenizer(eos_ids(args.model))
    prompts = [tok.encode(t) for t in args.prompt] + id_prompts
    for p in prompts:
        if not p:
            raise ConfigError("--prompt", "", "is empty: give at least one character (or --prompt-ids id)")
        if max(p) >= cfg.vocab_size or min(p) < 0:
            raise ConfigError("--prompt", p[:8], f"token ids must lie in [0, model.vocab_size={cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > cfg.max_seq_len:
        raise ConfigError("--max-new-tokens", args.max_new_tokens, f"prompt ({longest} tokens) + new tokens must be "
                          f"<= model.max_seq_len={cfg.max_seq_len}")
    return tok, prompts


def decode_graphs(args: argparse.Namespace, model, device: torch.device):
    """CUDA graphs for the decode steps (fsmoe.infer.decode_graph), unless ``--no-cuda-graph`` or on the CPU."""
    from fsmoe.infer.decode_graph import DecodeGraphs

    return DecodeGraphs(model) if device.type == "cuda" and not args.no_cuda_graph else None


def print_generation(console: Console, args, tok, prompts, out, device, how: str) -> None:
    for k, new in enumerate(out.new_tokens):
        if k < len(args.prompt):
            console.print(f"[bold]{args.prompt[k]}[/]", end="", markup=True)
            console.print(tok.decode(new), markup=False)
        else:
            console.print(" ".join(map(str, prompts[k])) + " -> " + " ".join(map(str, new)), markup=False)
    n_new = sum(len(t) for t in out.new_tokens)
    how += ", decode from CUDA graphs" if out.graphed else ""
    console.print(f"{len(prompts)} prompt(s), {out.prompt_tokens} prompt tokens, {n_new} new tokens on {device} "
                  f"({how}, {tok.name} tokenizer): prefill {1000 * out.prefill_s:.0f} ms, decode "
                  f"{out.decode_tokens_per_s:,.1f} tok/s", style="dim")


def run(args: argparse.Namespace) -> int:
    from fsmoe.infer.generate import Sampling, generate
    from fsmoe.infer.model import load_model

    check_args(args)
    device = pick_device(args)
    model, cfg, converted = load_model(args.model, device, getattr(torch, args.dtype))
    tok, prompts = encode_prompts(args, cfg, converted)
    s = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed, not args.no_cache, tok.eos_ids)
    out = generate(model, prompts, s, decode_graphs(args, model, device))
    print_generation(Console(soft_wrap=True, highlight=False), args, tok, prompts, out, device,
                     "KV cache" if s.use_cache else "no cache")
    return 0
