"""Recipe schedule values at key steps, presets, and config round trips."""

from __future__ import annotations

import json

import pytest

from bitllm.errors import BitLLMError
from bitllm.train.config import (
    PRESETS,
    RecipeConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    lr_at,
    parse_override,
    preset_config,
    recipe_for,
    resolve_config,
    weight_decay_at,
)


def test_two_stage_lr_and_weight_decay_at_key_steps():
    r = RecipeConfig(lr=1.5e-3, lr_stage2=1e-3, warmup_steps=10, min_lr_ratio=0.0)
    steps = 110
    assert lr_at(r, 0, steps) == pytest.approx(1.5e-4)  # warm-up is linear from lr/warmup
    assert lr_at(r, 9, steps) == pytest.approx(1.5e-3)  # peak at the end of warm-up
    assert lr_at(r, 10, steps) == pytest.approx(1.5e-3)
    assert lr_at(r, 54, steps) == pytest.approx(1.5e-3 * (1 - 44 / 100))  # stage 1 decays linearly
    # the switch at half way: the LR drops by lr_stage2 / lr and weight decay goes 0.1 -> 0
    before, after = lr_at(r, 54, steps), lr_at(r, 55, steps)
    assert after == pytest.approx(1e-3 * (1 - 45 / 100))
    assert after / before < 0.7
    assert weight_decay_at(r, 54, steps) == 0.1 and weight_decay_at(r, 55, steps) == 0.0
    assert lr_at(r, 109, steps) == pytest.approx(1e-3 * (1 - 99 / 100))  # decays to ~0 at the end
    lrs = [lr_at(r, s, steps) for s in range(steps)]
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warm-up


def test_fp_twin_recipe_is_single_stage():
    p = PRESETS["700m"]
    fp, bit = recipe_for(p, "none"), recipe_for(p, "ternary")
    assert (bit.lr, bit.lr_stage2, bit.betas) == (1.5e-3, 1e-3, (0.9, 0.95))
    assert fp.lr == 2.5e-4 and fp.lr_stage2 is None
    assert all(weight_decay_at(fp, s, 1000) == 0.1 for s in (0, 499, 500, 999))
    lrs = [lr_at(fp, s, 1000) for s in range(1000)]
    assert max(lrs) == pytest.approx(2.5e-4)
    assert all(b <= a for a, b in zip(lrs[375:], lrs[376:]))  # no drop at half way


def test_twins_differ_only_in_quant_and_recipe():
    t, f = preset_config("demo", "ternary").to_dict(), preset_config("demo", "none").to_dict()
    for d in (t, f):
        d.pop("quant"), d.pop("recipe")
    assert t == f


@pytest.mark.parametrize("name,shape", [("700m", (1536, 4096, 24)), ("1.3b", (2048, 5460, 24)),
                                        ("3b", (3200, 8640, 26)), ("3.9b", (3200, 12800, 26))])
def test_paper_presets(name, shape):
    m = PRESETS[name].model
    assert (m.hidden_size, m.intermediate_size, m.num_layers) == shape
    assert m.seq_len == 2048


def test_config_round_trips_through_json_and_yaml(tmp_path):
    cfg = preset_config("small", quant="binary", layout="llama", overrides={"recipe.lr": 2e-3, "steps": 7})
    d = json.loads(cfg.to_json())
    assert TrainConfig.from_dict(d) == cfg
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json())
    assert load_config(path) == cfg
    yaml = pytest.importorskip("yaml")
    ypath = tmp_path / "c.yaml"
    ypath.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(ypath) == cfg
    assert resolve_config(config_file=ypath, quant="ternary").quant == "ternary"


def test_bad_configs_say_what_to_change(tmp_path):
    with pytest.raises(BitLLMError, match="unknown field"):
        TrainConfig.from_dict({"model": {"hidden": 3}})
    with pytest.raises(BitLLMError, match="not one of"):
        preset_config("tiny", quant="int4")
    with pytest.raises(BitLLMError, match="unknown preset"):
        preset_config("7b")
    with pytest.raises(BitLLMError, match="no field"):
        apply_overrides(preset_config("tiny"), {"recipe.lrr": 1.0})
    with pytest.raises(BitLLMError, match="divisible"):
        preset_config("tiny", overrides={"model.num_heads": 5})
    assert parse_override("recipe.lr=1e-3") == ("recipe.lr", 1e-3)
    assert parse_override('data.train=["a.txt"]') == ("data.train", ["a.txt"])
    assert parse_override("model.layout=llama") == ("model.layout", "llama")


@pytest.mark.parametrize("override,match", [
    ({"recipe.lr_stage2": -1e-3}, "recipe.lr_stage2 must be a finite number > 0"),  # stage 2 would ascend the loss
    ({"recipe.lr": float("nan")}, "recipe.lr must be"),
    ({"save_every": 0}, "save_every must be >= 1"),  # a modulo by zero after the first step
    ({"log_every": 0}, "log_every must be >= 1"),
    ({"micro_batch_size": -1}, "micro_batch_size must be >= 1"),  # range(negative): steps with no data at all
    ({"recipe.warmup_steps": -5}, "warmup_steps must be >= 0"),
    ({"recipe.weight_decay": -0.1}, "weight_decay must be"),
    ({"recipe.min_lr_ratio": 2.0}, "min_lr_ratio"),
    ({"model.seq_len": 1}, "seq_len must be >= 2"),
])
def test_values_that_cannot_train_are_refused_up_front(override, match):
    with pytest.raises(BitLLMError, match=match):
        preset_config("tiny", overrides=override)
