"""Config: every bad value raises ConfigError naming its field; overrides parse; presets load."""
from __future__ import annotations

import copy

import pytest

from fsmoe.config import (ConfigError, RunConfig, apply_overrides, config_from_dict, list_presets, load_config,
                          parse_override)

# A small valid run, independent of the presets (which their owners may retune).
BASE = {
    "name": "t",
    "model": {"arch": "gpt", "vocab_size": 64, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 128,
              "moe": {"num_experts": 8, "router": {"name": "gshard", "top_k": 2}, "experts": {"d_ff": 32}}},
    "train": {"seq_len": 64},
}


def make(*overrides: str) -> RunConfig:
    return config_from_dict(apply_overrides(copy.deepcopy(BASE), list(overrides)))


def test_base_is_valid():
    cfg = make()
    assert cfg.model.moe.num_experts == 8 and cfg.parallel.world == 1


# (overrides, field named by the error, a phrase of the message)
BAD = [
    (["model.moe.router.top_k=9"], "model.moe.router.top_k", "num_experts=8"),
    (["model.moe.router.top_k=0"], "model.moe.router.top_k", "num_experts=8"),
    (["model.moe.router.capacity_factor=0"], "model.moe.router.capacity_factor", "> 0"),
    (["model.moe.router.capacity_factor=-1.5"], "model.moe.router.capacity_factor", "> 0"),
    (["model.moe.router.name=nosuch"], "model.moe.router.name", "allowed values"),
    (["model.moe.router.name=softmoe"], "model.moe.router.name", "not causal"),
    (["model.moe.router.name=expert_choice"], "model.moe.router.name", "allow_noncausal"),
    (["parallel.dp=3", "parallel.ep=3"], "parallel.ep", "does not divide num_experts=8"),
    (["parallel.dp=4", "parallel.ep=8"], "parallel.ep*esp", "must divide dp*mp=4"),  # dp=4, ep=2 is valid: edp=2
    (["parallel.dp=2", "parallel.ep=2", "parallel.gpus_per_node=3"], "parallel.gpus_per_node", "divide"),
    (["parallel.dp=0"], "parallel.dp", ">= 1"),
    (["model.moe.num_expert=16"], "model.moe.num_expert", "did you mean 'num_experts'"),
    (["trian.steps=3"], "trian", "did you mean 'train'"),
    (['model.d_model="big"'], "model.d_model", "must be of type int"),
    (["model.n_layers=true"], "model.n_layers", "must be of type int"),
    (["model.d_model=None"], "model.d_model", "must not be empty"),
    (["train.lr=fast"], "train.lr", "must be of type float"),
    (["model.moe=4"], "model.moe", "must be a table"),
    (["train.seq_len=256"], "train.seq_len", "max_seq_len=128"),
    (["model.n_heads=6"], "model.n_heads", "must divide d_model=64"),
    (["model.n_kv_heads=3"], "model.n_kv_heads", "must divide n_heads=4"),
    (["model.n_kv_heads=-2"], "model.n_kv_heads", ">= 1"),
    (["model.vocab_size=0"], "model.vocab_size", "> 0"),
    (["model.dropout=1.0"], "model.dropout", "[0, 1)"),
    (["model.arch=bert"], "model.arch", "allowed values"),
    (["model.attention=mla"], "model.attention", "arch='llama'"),
    (["model.arch=llama", "model.attention=mla", "model.qk_rope_head_dim=5"], "model.qk_rope_head_dim", "even"),
    (["model.arch=llama", "model.attention=mla", "model.kv_lora_rank=0"], "model.kv_lora_rank", "> 0"),
    (["model.arch=llama", "model.d_model=60"], "model.head_dim", "even"),
    (["model.rope_theta=0"], "model.rope_theta", "> 0"),
    (["model.moe.experts.activation=relu"], "model.moe.experts.activation", "allowed values"),
    (["model.moe.experts.d_ff=0"], "model.moe.experts.d_ff", "> 0"),
    (["model.moe.router.num_groups=3"], "model.moe.router.num_groups", "divide num_experts=8"),
    (["model.moe.router.num_groups=2", "model.moe.router.topk_groups=3"], "model.moe.router.topk_groups",
     "num_groups=2"),
    (["model.moe.router.name=deepseek", "model.moe.router.num_groups=4", "model.moe.router.topk_groups=1",
      "model.moe.router.top_k=3"], "model.moe.router.top_k", "topk_groups"),
    (["model.moe.router.aux_loss_coef=-0.1"], "model.moe.router.aux_loss_coef", ">= 0"),
    (["model.moe.dispatcher=magic"], "model.moe.dispatcher", "allowed values"),
    (["train.dtype=float16"], "train.dtype", "allowed values"),
    (["train.val_fraction=1"], "train.val_fraction", "(0, 1)"),
]


@pytest.mark.parametrize("overrides,field,phrase", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_names_field(overrides, field, phrase):
    with pytest.raises(ConfigError) as err:
        make(*overrides)
    assert err.value.field_name == field
    assert field in str(err.value) and phrase in str(err.value)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\nd_model = 64\n")
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_config(str(path))
    assert err.value.field_name == "config"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_config(str(tmp_path / "nope.toml"))
    assert err.value.field_name == "config"


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="known presets") as err:
        load_config("gpt5-moe")
    assert err.value.field_name == "preset"
    assert "mixtral-8x7b" in str(err.value)


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize("text,path,value", [
    ("model.moe.num_experts=16", ["model", "moe", "num_experts"], 16),
    ("model.moe.router.name=sigmoid", ["model", "moe", "router", "name"], "sigmoid"),  # bare word
    ('name="my run"', ["name"], "my run"),
    ("train.lr=1e-3", ["train", "lr"], 1e-3),
    ("model.tie_embeddings=true", ["model", "tie_embeddings"], True),
    ("model.qk_norm=false", ["model", "qk_norm"], False),
    ("model.moe.router.capacity_factor=None", ["model", "moe", "router", "capacity_factor"], None),
    ("model.moe.router.capacity_factor=null", ["model", "moe", "router", "capacity_factor"], None),
    (" train.steps = 7 ", ["train", "steps"], 7),
    ("train.data=a=b", ["train", "data"], "a=b"),  # split at the first '='
])
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


def test_override_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE") as err:
        parse_override("model.moe.num_experts")
    assert err.value.field_name == "--set"
    with pytest.raises(ConfigError, match="'d_model' is not a table"):
        make("model.d_model.x=1")


def test_overrides_apply_through_load_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nd_model = 64\nn_heads = 4\n[model.moe.router]\ncapacity_factor = 1.25\n')
    cfg = load_config(str(path), ["model.moe.num_experts=16", "model.moe.router.name=sigmoid",
                                  "model.moe.router.capacity_factor=None", "model.tie_embeddings=true",
                                  "train.lr=1"])
    assert cfg.name == "run"  # defaults to the file's stem
    assert cfg.model.moe.num_experts == 16
    assert cfg.model.moe.router.name == "sigmoid"
    assert cfg.model.moe.router.capacity_factor is None
    assert cfg.model.tie_embeddings is True
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # ints accepted for floats


def test_round_trip_through_dict():
    cfg = make("model.moe.router.top_k=1", "parallel.dp=2", "parallel.ep=2")
    assert config_from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- presets

PRESETS = ["tiny", "gpt2-xl-moe", "mixtral-8x7b", "mixtral-8x22b", "deepseek-v3", "qwen3-30b-a3b"]


def test_presets_listed():
    assert set(PRESETS) <= set(list_presets())


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert cfg.train.seq_len <= cfg.model.max_seq_len


def test_preset_override():
    cfg = load_config("mixtral-8x7b", ["model.n_layers=2", "parallel.dp=8", "parallel.ep=8"])
    assert cfg.model.n_layers == 2 and cfg.parallel.ep == 8
    with pytest.raises(ConfigError, match="parallel.ep"):
        load_config("mixtral-8x7b", ["parallel.dp=16", "parallel.ep=16"])  # 16 does not divide 8 experts


def test_placement_policies_refuse_the_hierarchical_dispatchers():
    """Replicas and spare slots live in the flat dispatch layout: a moving placement under the
    hierarchical or 2DH dispatcher is refused, naming the field and what it needs."""
    for dispatcher in ("hierarchical", "2dh"):
        with pytest.raises(ConfigError, match=r"parallel\.placement.*alltoall"):
            load_config("tiny", ["parallel.dp=4", "parallel.ep=4", "parallel.placement=flexmoe",
                                 f"model.moe.dispatcher={dispatcher}"])


def test_sharded_weights_refuse_compiled_blocks():
    with pytest.raises(ConfigError, match=r"train\.compile.*parallel\.shard='full'"):
        load_config("tiny", ["parallel.dp=2", "parallel.shard=full", "train.compile=true"])


def test_shard_modes_are_checked_by_name_and_against_moving_experts():
    assert load_config("tiny", ["parallel.dp=2", "parallel.shard=optimizer"]).parallel.shard == "optimizer"
    assert load_config("tiny", ["parallel.dp=2", "parallel.shard=full"]).parallel.shard == "full"
    with pytest.raises(ConfigError, match=r"parallel\.shard.*allowed values are \['full', 'none', 'optimizer'\]"):
        load_config("tiny", ["parallel.shard=zero3"])
    with pytest.raises(ConfigError, match=r"parallel\.shard.*placement='flexmoe'"):
        load_config("tiny", ["parallel.dp=4", "parallel.ep=4", "parallel.placement=flexmoe", "parallel.shard=optimizer"])
    with pytest.raises(ConfigError, match=r"parallel\.shard.*expert_swap_every=5"):
        load_config("tiny", ["parallel.dp=4", "parallel.ep=4", "parallel.expert_swap_every=5",
                             "parallel.shard=optimizer"])
