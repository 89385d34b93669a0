"""Write a random-weight Hugging Face checkpoint (config.json + bf16 safetensors shards + index) of an
fsmoe preset, without transformers and without holding more than one shard in memory: for
measuring `fsmoe convert` on a model of realistic shape where nothing can be downloaded.

    python scripts/make_hf_checkpoint.py qwen3-30b-a3b OUT_DIR --layers 6 --shard-gb 4

The tensor names, shapes and config.json come from fsmoe's own family table (fsmoe.models.hf),
so this is exactly what `fsmoe convert --to-hf` would write for that model.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fsmoe.config import load_config
from fsmoe.models.hf import FAMILIES
from fsmoe.models.hf.convert import export_family, model_shapes
from fsmoe.models.hf.files import CONFIG, shard_names, write_index, write_shard
from fsmoe.models.hf.mapping import expand, hf_shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", help="an fsmoe preset with a Hugging Face counterpart, e.g. qwen3-30b-a3b")
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=6, help="model.n_layers (the preset's if 0)")
    p.add_argument("--shard-gb", type=float, default=4.0)
    p.add_argument("--family", choices=sorted(FAMILIES))
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.d_model=64 (a small model for a quick check)")
    args = p.parse_args()
    layers = [f"model.n_layers={args.layers}"] if args.layers else []
    cfg = load_config(args.preset, layers + args.overrides).model
    fam = export_family(cfg, None, args.family)
    shapes = model_shapes(cfg)
    tensors = [(name, hf_shape(e, shapes[e.ours])) for e in expand(fam.table, cfg) for name in e.hf]
    limit = int(args.shard_gb * 2**30)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for name, shape in tensors:
        n = torch.Size(shape).numel() * 2
        if shards[-1] and acc + n > limit:
            shards.append([])
            acc = 0
        shards[-1].append((name, shape))
        acc += n
    args.out.mkdir(parents=True, exist_ok=False)
    files, weight_map, total, t0 = shard_names(len(shards)), {}, 0, time.perf_counter()
    g = torch.Generator().manual_seed(0)
    for file, shard in zip(files, shards):
        out = {}
        for name, shape in shard:
            out[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += out[name].numel() * 2
        write_shard(args.out / file, out)
        print(f"wrote {file}: {len(out)} tensors, {sum(t.numel() for t in out.values()) * 2 / 2**30:.2f} GiB",
              flush=True)
    if len(files) > 1:
        write_index(args.out, weight_map, total)
    hf_cfg = fam.hf_config(cfg)
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = "bfloat16"
    (args.out / CONFIG).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    print(f"{fam.architecture} with {cfg.n_layers} layers: {total / 2**30:.2f} GiB in {len(files)} shard(s), "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
