"""Hugging Face checkpoints in and out, and generation, against ``transformers`` itself.

For each family (Mixtral, Qwen3-MoE with a dense layer, DeepSeek-V3 with MLA, a dense layer,
shared experts, routing bias and group-limited routing), a tiny random model saved by
``save_pretrained``:

- fsmoe's logits equal transformers' (fp32, max abs diff <= 1e-5);
- HF -> fsmoe -> HF gives the same tensors byte for byte, and ``from_pretrained`` loads the result;
- ``generate`` greedy equals transformers' greedy ``generate``, with and without the KV cache, and
  each cached decode step's logits equal an uncached forward;
- bad input (another architecture, a missing shard, mismatched shapes, a used output) is one
  error line naming the file and tensor, exit code 2, nothing written.

The EP=2 load of a converted checkpoint is in test_dist_hf.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fsmoe import cli
from fsmoe.config import ModelConfig, load_config
from fsmoe.infer.generate import Sampling, generate
from fsmoe.infer.model import load_model
from fsmoe.models import build_model
from fsmoe.models.hf import FAMILIES
from fsmoe.models.hf.convert import hf_to_run, model_shapes, run_to_hf
from fsmoe.models.hf.mapping import Entry, Layout, expand, to_hf, to_ours
from fsmoe.models.kv_cache import KVCache

from hf_models import build, save

transformers = pytest.importorskip("transformers")
FAMS = ["mixtral", "qwen3_moe", "deepseek_v3"]
ATOL = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than several, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_dirs(one_thread, tmp_path_factory):
    """family -> (HF dir, converted fsmoe run dir). DeepSeek is saved in several shards."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam in FAMS:
        src = save(fam, root / "src", max_shard_size="100KB" if fam == "deepseek_v3" else None)
        hf_to_run(src, root / "run" / fam)
        out[fam] = (src, root / "run" / fam)
    return out


def ids(B: int = 3, L: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(seed))


def hf_model(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("fam", FAMS)
def test_logits_equal_transformers(hf_dirs, fam):
    src, run = hf_dirs[fam]
    ref = hf_model(src)
    for path in (src, run):  # straight from the HF directory, and from the converted run
        model, _, _ = load_model(path, CPU, torch.float32)
        with torch.no_grad():
            diff = (model(ids()).logits - ref(ids()).logits).abs().max().item()
        assert diff <= ATOL, f"{fam} from {path.name}: max abs diff {diff}"


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("fam", ["deepseek_v3", "qwen3_moe"])
def test_yarn_rope_scaling_equals_transformers_and_exports(fam, tmp_path):
    """YaRN (DeepSeek-V3's long context; MLA's softmax scale too), past the original context."""
    src = save(fam, tmp_path, seed=5, rope_parameters=YARN)
    hf_to_run(src, tmp_path / "run")
    model, cfg, _ = load_model(tmp_path / "run", CPU, torch.float32)
    assert cfg.rope_scaling.kind == "yarn" and cfg.rope_scaling.factor == 4.0
    x = ids(2, 40)
    with torch.no_grad():
        diff = (model(x).logits - hf_model(src)(x).logits).abs().max().item()
    assert diff <= ATOL, f"{fam} with YaRN: max abs diff {diff}"
    run_to_hf(tmp_path / "run", tmp_path / "back")
    params = json.loads((tmp_path / "back" / "config.json").read_text())["rope_parameters"]
    assert {k: params[k] for k in YARN} == YARN


@pytest.mark.parametrize("fam", FAMS)
def test_hf_to_fsmoe_to_hf_is_byte_identical(hf_dirs, fam, tmp_path):
    src, run = hf_dirs[fam]
    back = tmp_path / "back"
    run_to_hf(run, back, max_shard_bytes=60_000)  # several shards and an index on the way back too

    def tensors(root: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    a, b = tensors(src), tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)), k
    assert (back / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert torch.equal(hf_model(back)(ids()).logits, hf_model(src)(ids()).logits)


@pytest.mark.parametrize("fam", FAMS)
def test_generate_greedy_equals_transformers(hf_dirs, fam):
    src, run = hf_dirs[fam]
    prompt = ids(2, 5, seed=1)
    ref = hf_model(src).generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 5:].tolist()
    model, _, _ = load_model(run, CPU, torch.float32)
    for cache in (True, False):
        out = generate(model, prompt.tolist(), Sampling(max_new_tokens=8, use_cache=cache))
        assert out.new_tokens == ref, f"{fam} use_cache={cache}"


@pytest.mark.parametrize("fam", FAMS)
def test_cached_decode_equals_uncached_forward(hf_dirs, fam):
    """Left-padded batch: every cached step's logits equal a full forward of the sequence so far."""
    model, _, _ = load_model(hf_dirs[fam][1], CPU, torch.float32)
    seq, pad = ids(2, 12, seed=2), torch.tensor([0, 3])
    cache = KVCache.for_model(model, 2, 12)
    with torch.no_grad():
        steps = [model(seq[:, :6], cache=cache, start=0, pad_B=pad).logits[:, -1]]
        steps += [model(seq[:, t:t + 1], cache=cache, start=t, pad_B=pad).logits[:, -1] for t in range(6, 12)]
        full = [model(seq[:, :t + 1], pad_B=pad).logits[:, -1] for t in range(5, 12)]
    for t, (a, b) in enumerate(zip(steps, full)):  # fp32: sums in another order (logits up to ~5 here)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=ATOL, msg=lambda m: f"{fam} step {t}: {m}")


def test_gpt_byte_model_cached_equals_uncached_and_padding_is_invisible():
    """fsmoe's own GPT-style runs (learned positions): the cache and left padding change nothing."""
    cfg = load_config("tiny", ["model.d_model=32", "model.n_layers=2", "model.d_ff=64", "model.max_seq_len=32",
                               "train.seq_len=32", "model.moe.num_experts=4", "model.moe.experts.d_ff=16"]).model
    model = build_model(cfg, seed=0).eval()
    prompts = [[100, 101, 32], [35, 36, 37, 38, 39, 40, 41]]
    cached = generate(model, prompts, Sampling(max_new_tokens=9)).new_tokens
    assert cached == generate(model, prompts, Sampling(max_new_tokens=9, use_cache=False)).new_tokens
    assert cached == [generate(model, [p], Sampling(max_new_tokens=9)).new_tokens[0] for p in prompts]
    sampling = Sampling(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=3)
    assert generate(model, prompts, sampling).new_tokens == generate(model, prompts, sampling).new_tokens


def test_mla_cache_is_the_compressed_latent(hf_dirs):
    model, cfg, _ = load_model(hf_dirs["deepseek_v3"][1], CPU, torch.float32)
    per_token = KVCache.for_model(model, 1, 4).bytes_per_token()
    assert per_token == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


# ---------------------------------------------------------------- the tables


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("variant", ["plain", "tied", "no_q_lora"])
def test_table_covers_the_model_and_inverts(fam, variant):
    """Each family's table names every fsmoe tensor once, and to_hf inverts to_ours exactly."""
    hf_cfg = build(fam).config.to_dict()
    if variant == "tied":
        hf_cfg["tie_word_embeddings"] = True
    if variant == "no_q_lora":
        hf_cfg["q_lora_rank"] = None
    family = FAMILIES[fam]
    from fsmoe.config import model_config_from_dict

    cfg = model_config_from_dict(family.model_config(hf_cfg))
    shapes = model_shapes(cfg)
    entries = expand(family.table, cfg)
    ours = [e.ours for e in entries] + (["lm_head.weight"] if cfg.tie_embeddings else [])
    assert sorted(ours) == sorted(shapes)
    hf_names = [n for e in entries for n in e.hf]
    assert len(hf_names) == len(set(hf_names))
    layout = Layout(cfg, family.rope_interleaved(hf_cfg))
    for e in entries:
        t = torch.randn(shapes[e.ours])
        assert torch.equal(to_ours(e, to_hf(e, t, layout), layout), t), e.ours


def test_deepseek_rope_rows_go_from_interleaved_to_half_split():
    cfg = ModelConfig(arch="llama", attention="mla", qk_nope_head_dim=2, qk_rope_head_dim=4, kv_lora_rank=3)
    layout = Layout(cfg, rope_interleaved=True)
    q = torch.arange(12.0)[:, None]  # 2 heads x (2 nope + 4 rope) rows
    assert to_ours(Entry("q", ("q",), "rope_q"), [q], layout).flatten().tolist() == [0, 1, 2, 4, 3, 5,
                                                                                       6, 7, 8, 10, 9, 11]
    kv = torch.arange(7.0)[:, None]  # 3 latent + 4 rope rows
    assert to_ours(Entry("kv", ("kv",), "rope_kv"), [kv], layout).flatten().tolist() == [0, 1, 2, 3, 5, 4, 6]
    stacked = to_ours(Entry("w", ("a", "b"), "experts"), [torch.ones(5, 3), 2 * torch.ones(5, 3)], layout)
    assert stacked.shape == (2, 3, 5) and stacked[1].eq(2).all()


# ---------------------------------------------------------------- the commands


def run_cli(*args: str) -> int:
    return cli.main([str(a) for a in args])


def test_cli_convert_both_ways_generate_and_train_init_from(hf_dirs, tmp_path, capsys):
    src, _ = hf_dirs["qwen3_moe"]
    assert run_cli("convert", src, tmp_path / "run", "--report", tmp_path / "r.json") == 0
    out = capsys.readouterr().out
    assert "peak host memory" in out and json.loads((tmp_path / "r.json").read_text())["family"] == "qwen3_moe"
    assert run_cli("convert", tmp_path / "run", tmp_path / "hf", "--to-hf", "--dtype", "bfloat16") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    assert run_cli("generate", tmp_path / "run", "--prompt-ids", "1 2 3", "--prompt-ids", "4,5",
                   "--max-new-tokens", "4", "--temperature", "0.7", "--top-p", "0.9") == 0
    assert "tok/s" in capsys.readouterr().out
    for init in (tmp_path / "run", src):  # a converted run, and the HF directory itself
        run_dir = tmp_path / f"train-{init.name}"
        assert run_cli("train", "--init-from", init, "--run-dir", run_dir, "--steps", "2", "--set",
                       "train.batch_size=2", "train.seq_len=16", "train.eval_batches=1",
                       "train.data_limit_mb=0.05") == 0
        assert json.loads((run_dir / "config.json").read_text())["model"]["moe"]["num_experts"] == 4
    assert "weights from" in capsys.readouterr().out


def test_init_from_starts_from_the_converted_weights(hf_dirs, tmp_path):
    from fsmoe.config import config_from_dict
    from fsmoe.models.hf.convert import source_model
    from fsmoe.train import Trainer

    src, run = hf_dirs["deepseek_v3"]
    cfg = config_from_dict({"model": source_model(run), "train": {"seq_len": 16, "batch_size": 2,
                                                                  "data_limit_mb": 0.05}})
    trainer = Trainer(cfg, tmp_path / "t", init_from=run)
    ref = hf_model(src)
    with torch.no_grad():
        assert (trainer.model.eval()(ids()).logits - ref(ids()).logits).abs().max() <= ATOL


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_exit_2_name_the_file_and_tensor_and_write_nothing(hf_dirs, tmp_path, capsys):
    src, run = hf_dirs["deepseek_v3"]
    out = tmp_path / "out"

    other = tmp_path / "llama"  # another architecture
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    assert run_cli("convert", other, out) == 2
    assert "config.json" in (err := _error(capsys)) and "LlamaForCausalLM" in err and "MixtralForCausalLM" in err

    missing = tmp_path / "missing"  # a shard listed in the index is gone
    missing.mkdir()
    for f in src.iterdir():
        (missing / f.name).write_bytes(f.read_bytes())
    gone = sorted(missing.glob("model-*.safetensors"))[1]
    gone.unlink()
    assert run_cli("convert", missing, out) == 2
    assert gone.name in (err := _error(capsys)) and "model.layers." in err

    wrong = tmp_path / "wrong"  # config.json and the tensors disagree
    wrong.mkdir()
    for f in src.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["moe_intermediate_size"] = 24
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert run_cli("convert", wrong, out) == 2
    err = _error(capsys)
    assert "safetensors: model.layers.1.mlp." in err and "[16, 32]" in err and "[24, 32]" in err

    cfg = json.loads((src / "config.json").read_text())  # a setting fsmoe would compute differently
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (wrong / "config.json").write_text(json.dumps(cfg))
    assert run_cli("convert", wrong, out) == 2
    assert "rope_type" in _error(capsys)

    # config.json fields of the wrong type or range are named (not a TypeError / ZeroDivisionError)
    for key, value in (("hidden_size", "abc"), ("num_attention_heads", 0), ("rope_parameters", "x"),
                       ("rope_parameters", {"rope_type": "yarn", "original_max_position_embeddings": 0})):
        cfg = json.loads((src / "config.json").read_text())
        cfg[key] = value
        (wrong / "config.json").write_text(json.dumps(cfg))
        assert run_cli("convert", wrong, out) == 2
        err = _error(capsys)
        assert key in err or "original_max_position_embeddings" in err, err
    (wrong / "config.json").write_text((src / "config.json").read_text())
    shard = sorted(wrong.glob("model-*.safetensors"))[0]  # garbage where a shard is: no MemoryError
    shard.write_bytes(b"garbage, not a safetensors header")
    assert run_cli("convert", wrong, out) == 2
    assert shard.name in _error(capsys)

    assert run_cli("convert", src, run) == 2  # an output that already holds something
    assert "already exists" in _error(capsys)
    assert run_cli("generate", run, "--prompt-ids", "1 999") == 2
    assert "vocab_size" in _error(capsys)
    assert run_cli("generate", run, "--prompt", "hi") == 2  # a converted model without tokenizer.json
    assert "tokenizer.json" in _error(capsys)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_a_damaged_checkpoint_without_checksums_is_named_not_a_traceback(hf_dirs, tmp_path, capsys):
    """A run's newest checkpoint whose files are damaged and that has no checksums to catch it
    (copied by hand, an older fsmoe): generate names it and exits 2 (train --init-from loads the same way)."""
    import shutil

    _, run = hf_dirs["qwen3_moe"]
    for damage in ("data", "metadata"):
        copy = tmp_path / damage
        shutil.copytree(run, copy)
        ckpt = next(p for p in (copy / "ckpt").iterdir() if p.is_dir())
        for f in ckpt.glob("checksums.json"):
            f.unlink()
        victim = ckpt / ".metadata" if damage == "metadata" else next(ckpt.glob("*.distcp"))
        victim.write_bytes(victim.read_bytes()[:200] if damage == "data" else b"garbage\n")
        assert run_cli("generate", copy, "--prompt-ids", "1 2", "--max-new-tokens", "1") == 2
        err = _error(capsys)
        assert "checkpoint=" in err and ckpt.name in err and "damaged" in err, err


def test_reading_a_run_leaves_its_damaged_checkpoint_in_place(hf_dirs, tmp_path, capsys):
    """generate reads the newest intact checkpoint; unlike a resumed training run it renames
    nothing (it only reads the run)."""
    import shutil

    _, run = hf_dirs["qwen3_moe"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    good = next(p for p in (copy / "ckpt").iterdir() if p.is_dir())
    bad = good.with_name(f"step_{int(good.name.split('_')[1]) + 1}")
    shutil.copytree(good, bad)
    data = next(bad.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-8] + b"damaged!")  # the checksums catch it
    assert run_cli("generate", copy, "--prompt-ids", "1 2", "--max-new-tokens", "1") == 0
    assert bad.is_dir() and not bad.with_name(bad.name + ".damaged").exists()


def test_export_refuses_what_the_family_cannot_express(tmp_path, capsys):
    """A GPT-style fsmoe run has no HF counterpart among the families: named, exit 2, nothing written."""
    run = tmp_path / "gpt"
    cfg = load_config("tiny", ["model.d_model=16", "model.n_layers=1", "model.d_ff=32", "model.moe.num_experts=2",
                               "model.moe.experts.d_ff=8", "model.moe.router.top_k=1"])
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert run_cli("convert", run, tmp_path / "hf", "--to-hf") == 2
    assert "model.arch" in _error(capsys) and not (tmp_path / "hf").exists()


def test_top_p_keeps_the_smallest_set_reaching_p_and_greedy_takes_the_best():
    from fsmoe.infer.generate import choose

    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log()  # probabilities 0.5, 0.3, 0.2, 0
    g = torch.Generator().manual_seed(0)
    picks = {int(choose(logits, Sampling(temperature=1.0, top_p=0.6), g)) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 < 0.6, so the second token is needed; the third is not
    picks = {int(choose(logits, Sampling(temperature=1.0, top_p=0.4), g)) for _ in range(50)}
    assert picks == {0}
    assert int(choose(logits, Sampling(), None)) == 0


def test_generate_uses_the_tokenizer_json_a_conversion_carries(hf_dirs, tmp_path, capsys):
    """tokenizer.json beside the weights travels into the run; text prompts go through it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "src"
    src.mkdir()
    for f in hf_dirs["mixtral"][0].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 256)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    assert run_cli("convert", src, tmp_path / "run") == 0 and (tmp_path / "run" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert run_cli("generate", tmp_path / "run", "--prompt", "w7 w8 w9", "--prompt-ids", "7 8 9",
                   "--max-new-tokens", "5") == 0
    lines = capsys.readouterr().out.splitlines()
    new_ids = [int(i) for i in lines[1].split("->")[1].split()]
    assert lines[0] == "w7 w8 w9" + tok.decode(new_ids) and "tokenizer.json tokenizer" in lines[2]


def _init_from_in_shards(rank, world, args):
    from fsmoe.config import ParallelConfig, model_config_from_dict
    from fsmoe.models.hf.convert import load_weights, source_model
    from fsmoe.parallel.build import build_sharded_model, load_into_shards
    from fsmoe.parallel.checkpoint import Meshes
    from fsmoe.parallel.groups import build_groups
    from fsmoe.parallel.tensor_parallel import parallelize

    par, sources = args
    groups = build_groups(ParallelConfig(**par))
    meshes = Meshes.build(groups)
    out = {}
    for src in sources:
        cfg = model_config_from_dict(source_model(Path(src)))
        whole = build_model(cfg, seed=0)
        load_weights(whole, Path(src))
        whole = parallelize(whole, groups)
        mine = build_sharded_model(cfg, groups, torch.device("cpu"), seed=1)  # other random weights first
        load_into_shards(mine, Path(src), groups, meshes)
        a, b = whole.state_dict(), mine.state_dict()
        out[src] = [n for n in a if not torch.equal(a[n], b[n])]
    return out


@pytest.mark.dist
def test_init_from_reads_each_ranks_shard_of_a_hf_directory_or_run(hf_dirs):
    """--init-from under --nproc: the model built shard by shard reads its slices of a HF
    directory (one stored tensor at a time) or a converted run's checkpoint (DCP), equal to
    loading the whole model in one process and slicing it (DP2 x EP2 with MP2: 4 processes)."""
    from dist_utils import run_workers

    sources = [str(hf_dirs["qwen3_moe"][0]), str(hf_dirs["qwen3_moe"][1]), str(hf_dirs["mixtral"][0]),
               str(hf_dirs["deepseek_v3"][0])]
    par = {"dp": 2, "mp": 2, "ep": 2, "gpus_per_node": 2}
    for res in run_workers(_init_from_in_shards, 4, (par, sources), timeout_s=180):
        assert all(not bad for bad in res.values()), res
