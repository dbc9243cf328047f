"""One config schema for YAML, JSON, flags and run.json; every bad value is one clear message."""

from __future__ import annotations

import argparse

import pytest

from engine.config import RunConfig, add_config_flags, apply_config_flags
from engine.errors import UserError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return parser.parse_args(list(argv))


def test_flags_mirror_field_names_and_override_a_file(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("name: a\ntrain:\n  lr: 0.01\n  micro_batch: 4\ndata:\n  seq_len: 64\n")
    cfg = RunConfig.load(path)
    apply_config_flags(cfg, parse("--max-steps", "200", "--micro-batch", "8", "--precision", "bf16", "--compile"))
    cfg.validate()
    assert (cfg.name, cfg.train.lr, cfg.train.micro_batch, cfg.train.max_steps) == ("a", 0.01, 8, 200)
    assert cfg.train.precision == "bf16" and cfg.train.compile is True and cfg.data.seq_len == 64


def test_yaml_and_json_round_trip(tmp_path) -> None:
    cfg = RunConfig(name="x")
    cfg.train.schedule = "wsd"
    (tmp_path / "c.yaml").write_text(cfg.dump_yaml())
    assert RunConfig.load(tmp_path / "c.yaml") == cfg
    import json

    (tmp_path / "run.json").write_text(json.dumps({"config": cfg.to_dict(), "runs": []}))
    assert RunConfig.load(tmp_path / "run.json") == cfg


def test_hash_ignores_the_name_only() -> None:
    a, b = RunConfig(name="a"), RunConfig(name="b")
    assert a.hash() == b.hash()
    b.train.lr = 0.5
    assert a.hash() != b.hash()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"lr": "fast"}}, "train.lr: expected float"),
        ({"train": {"lr": -1}}, "train.lr must be a positive number"),
        ({"train": {"keep_last": 1}}, "keep_last must be at least 2"),
        ({"train": {"schedule": "zigzag"}}, "train.schedule must be one of"),
        ({"train": {"precision": "int3"}}, "train.precision must be one of"),
        ({"data": {"seq_len": 1}}, "seq_len must be at least 2"),
        ({"model": {"preset": "7T"}}, "unknown preset"),
        ({"name": "../escape"}, "invalid model name"),
        ({"name": "a/b"}, "invalid model name"),
        ({"train": {"lrr": 1}}, "unknown key(s) in 'train': lrr"),
        ({"optimizer": {}}, "unknown config key(s): optimizer"),
        ({"train": {"micro_batch": 1.5}}, "train.micro_batch: expected int"),
        ({"train": {"micro_batch": True}}, "train.micro_batch: expected int, got True"),
        ({"train": {"lr": False}}, "train.lr: expected float, got False"),
        ({"data": {"tokenizer": {"bpe": 8192}}}, "data.tokenizer: expected str, got {'bpe': 8192}"),
        ({"data": {"source": ["a.txt", "b.txt"]}}, "data.source: expected str, got ['a.txt', 'b.txt']"),
        ({"train": {"compile": 5}}, "train.compile: expected bool, got 5"),
        ({"train": {"epochs": float("inf")}}, "train.epochs must be a finite number, got inf"),
        ({"train": {"lr": float("inf")}}, "train.lr must be a finite number, got inf"),
        ({"train": {"weight_decay": float("nan")}}, "train.weight_decay must be a finite number, got nan"),
    ],
)
def test_bad_values_are_one_line_errors(data, message) -> None:
    with pytest.raises(UserError) as info:
        RunConfig.from_dict(data).validate()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_and_malformed_files(tmp_path) -> None:
    with pytest.raises(UserError, match="cannot read config"):
        RunConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        RunConfig.load(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        RunConfig.load(tmp_path / "list.yaml")
