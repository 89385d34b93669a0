"""Property tests over every config field: random out-of-range or ill-typed values give a
ConfigError naming the field (never another exception), and what is accepted is usable: it
survives the config.json round trip of ``--resume`` and builds a model that runs forward.

Seeded (``random.Random``), so a failure reproduces; the failing field and value are in the message.
"""
from __future__ import annotations

import dataclasses
import json
import random
import typing

import pytest
import torch

from fsmoe.config import ConfigError, RunConfig, config_from_dict, load_config, raw_config
from fsmoe.models import build_model

SMALL = ["model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.d_ff=32", "model.max_seq_len=16",
         "model.moe.num_experts=4", "model.moe.experts.d_ff=16", "train.batch_size=2", "train.seq_len=8"]
TOML_FRAGMENTS = ["1e999", "-1e999", "nan", "-nan", "inf", "+inf", "[1, 2", "{a = 1}", "[]", "[[]]", '"x"', "'",
                  "true", "-0", "0x10", "1_000", "9" * 30, "-9" * 20, "", " ", "=", "none", "null", "\\u0000",
                  "2024-01-01", "1.5.3", '"../.."', "-1", "0", "0.0", "1e-320"]


def leaf_fields(cls=RunConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of the config dataclasses."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def wild_value(rng: random.Random):
    """Any JSON/TOML-like value, mostly out of range or of the wrong type."""
    return rng.choice([
        lambda: rng.choice([0, -1, 1, 2**63 - 1, -(2**63), 10**30]),
        lambda: -rng.randrange(1, 10**9),
        lambda: rng.randrange(2**62),
        lambda: rng.choice([float("nan"), float("inf"), -float("inf"), -0.0, 1e308, -1e308, 5e-324, 1.5, -1.5]),
        lambda: rng.uniform(-1e6, 1e6),
        lambda: rng.choice(["", " ", "x" * 300, "../..", "\0", "é", "auto", "none", "gpt", "swiglu", "1"]),
        lambda: rng.choice([True, False, None]),
        lambda: rng.choice([[], [1, "a"], ["a"], [""], {}, {"a": 1}, [[1]]]),
    ])()


def small_value(rng: random.Random):
    """A small value of any type: often in range, so it reaches the model."""
    return rng.choice([
        lambda: rng.randint(-2, 9),
        lambda: rng.choice([-1.0, 0.0, 1e-9, 0.5, 0.999, 1.0, 2.0, 3.0]),
        lambda: rng.choice([True, False, None]),
        lambda: rng.choice(["gpt", "llama", "mha", "mla", "gelu", "swiglu", "sigmoid", "deepseek", "xmoe", "softmoe",
                            "expert_choice", "switch", "auto", "local", "torch", "float32", "cpu", "default"]),
    ])()


def with_field(base: dict, path: str, value) -> dict:
    data = json.loads(json.dumps(base))
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return data


def build_or_config_error(data: dict, what: str) -> RunConfig | None:
    """The config, or None on ConfigError; any other exception fails the test naming ``what``."""
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        assert e.field_name and str(e.field_name) in str(e), what
        return None
    except Exception as e:  # pragma: no cover - the failure message is the point
        pytest.fail(f"{what}: {type(e).__name__}: {e}")
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, f"{what}: config.json round trip"
    return cfg


def test_every_field_with_wild_values_gives_a_config_error_or_a_valid_config():
    rng, base, fields = random.Random(0), raw_config("tiny", SMALL), leaf_fields()
    for _ in range(1500):
        path, value = rng.choice(fields), wild_value(rng)
        build_or_config_error(with_field(base, path, value), f"{path}={value!r}")


def test_random_set_text_gives_a_config_error_or_a_valid_config():
    rng, fields = random.Random(1), leaf_fields()
    for _ in range(600):
        text = f"{rng.choice(fields + ['model', 'no.such', ''])}={rng.choice(TOML_FRAGMENTS)}"
        try:
            load_config("tiny", [*SMALL, text])
        except ConfigError:
            pass
        except Exception as e:
            pytest.fail(f"--set {text!r}: {type(e).__name__}: {e}")


MODEL_FIELDS = [f for f in leaf_fields() if f.startswith("model.")]


def test_accepted_small_model_values_build_a_model_that_runs():
    """Values the config accepts reach the model: it must build and run forward + backward."""
    rng, base = random.Random(2), raw_config("tiny", SMALL)
    accepted = 0
    for _ in range(200):
        path, value = rng.choice(MODEL_FIELDS), small_value(rng)
        cfg = build_or_config_error(with_field(base, path, value), f"{path}={value!r}")
        if cfg is None:
            continue
        accepted += 1
        try:
            model = build_model(cfg.model, seed=0)
            x_BL = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len))
            out = model(x_BL)
            (out.logits.float().mean() + out.aux_loss.float()).backward()
        except Exception as e:
            pytest.fail(f"{path}={value!r} is accepted by the config but the model fails: {type(e).__name__}: {e}")
    assert accepted > 30
