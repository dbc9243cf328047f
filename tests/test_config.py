"""One config schema for YAML, JSON, flags and run.json; every bad value is one clear message."""

from __future__ import annotations

import argparse
import json

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
        ({"data": {"seq_len": None}}, "data.seq_len is required, got none"),
        ({"train": {"lr": None}}, "train.lr is required, got none"),
        ({"train": {"max_steps": "1e400"}}, "train.max_steps: '1e400' is out of range"),
        ({"train": {"max_steps": 10**400}}, "train.max_steps <an integer of about 401 digits> is unreasonably large"),
        ({"train": {"micro_batch": 10**20}}, "train.micro_batch 100,000,000,000,000,000,000 is unreasonably large"),
        ({"train": {"lr": 10**400}}, "train.lr: <an integer of about 401 digits> is out of range"),
        ({"train": {"seed": 2**64}}, "train.seed must be between -2**63 and 2**64-1"),
        ({"train": {"estimated_total_sequences": -5}}, "train.estimated_total_sequences must be positive, got -5"),
        ({"data": {"split": ""}}, "data.split is empty"),
        ({"data": {"source": "x" * 5000}}, "data.source is 5,000 characters long"),
        ({"name": "-rf"}, "invalid model name '-rf'"),
        ({"train": None}, "config section 'train' must be a mapping"),
        ({"train": {1: 2, "x": 3}}, "unknown key(s) in 'train': 1, x"),
        ({"config": [1]}, "run.json 'config' must be a mapping"),
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


def test_values_set_in_code_get_the_same_checks() -> None:
    """validate() holds a config built in code (the TUI's, a test's) to the types a file gets."""
    cfg = RunConfig()
    cfg.train.micro_batch = "8"  # type: ignore[assignment]
    with pytest.raises(UserError, match="train.micro_batch: expected int, got '8'"):
        cfg.validate()
    cfg = RunConfig()
    cfg.data.seq_len = None  # type: ignore[assignment]
    with pytest.raises(UserError, match="data.seq_len is required"):
        cfg.validate()


def test_integers_as_flags_and_text() -> None:
    cfg = apply_config_flags(RunConfig(), parse("--max-tokens", "1e9", "--micro-batch", "8.0", "--max-steps", "1_000",
                                                "--seed", str(2**64 - 1), "--warmup-steps", "none"))
    assert (cfg.train.max_tokens, cfg.train.micro_batch, cfg.train.max_steps) == (10**9, 8, 1000)
    assert cfg.validate().train.seed == 2**64 - 1 and cfg.train.warmup_steps is None
    for value, message in (("1.5", "expected int"), ("nan", "expected int"), ("1e400", "out of range"),
                           ("9" * 5000, "out of range"), ("", "expected int")):
        with pytest.raises(UserError, match=message):
            apply_config_flags(RunConfig(), parse("--micro-batch", value))
    with pytest.raises(UserError, match="invalid model name ''"):
        apply_config_flags(RunConfig(), parse("--name", ""))


def test_a_yaml_alias_bomb_is_refused_at_once_in_a_short_line(tmp_path) -> None:
    """Nine levels of nine aliases: str() of it walks 9**9 items; the refusal must look at a few."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    for tail, where in (("name: *l8", "name"), ("train: {micro_batch: *l8}", "train.micro_batch")):
        path = tmp_path / "bomb.yaml"
        path.write_text("\n".join(lines) + "\n" + tail + "\n")
        with pytest.raises(UserError) as info:  # before the l0..l8 keys are found unknown
            RunConfig.load(path)
        assert str(info.value).startswith(f"{where}: expected ") and len(str(info.value)) < 150


def test_files_that_are_not_configs(tmp_path) -> None:
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "big.yaml").write_text("# " + "x" * (2 << 20))
    (tmp_path / "deep.json").write_text("[" * 100_000)
    for name, message in (("latin1.yaml", "is not UTF-8 text"), ("empty.yaml", "is empty"),
                          ("big.yaml", "is larger than 1,024 KiB"), ("deep.json", "nested too deeply"),
                          (".", "is not a regular file")):
        with pytest.raises(UserError, match=message):
            RunConfig.load(tmp_path / name)


@pytest.mark.parametrize(("shape", "message"), [
    ({"hidden_size": -1}, "hidden_size must be a positive integer"),
    ({"hidden_size": 64, "num_attention_heads": 5}, "hidden_size 64 is not a multiple of num_attention_heads 5"),
    ({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"hidden_size": 12, "num_attention_heads": 4}, "the head size 3 is odd"),
    ({"rms_norm_eps": float("inf")}, "rms_norm_eps must be a positive finite number, got inf"),
    ({"rope_theta": 10**400}, "rope_theta must be a positive finite number"),
    ({"hidden_size": "abc"}, "hidden_size must be a positive integer (at most 16,777,216), got 'abc'"),
    ({"hidden_size": True}, "hidden_size must be a positive integer"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings must be true or false"),
    ({"eos_token_id": [1, "x"]}, "eos_token_id must be a token id"),
    ({"hidden_act": "nope"}, "hidden_act must be one of"),
    ({"rope_parameters": 5}, "rope_parameters must be an object or null"),
    ({"model_type": "gpt2"}, "describes a 'gpt2' model"),
    ({"max_position_embeddings": 16}, "max_position_embeddings 16 < seq_len 256"),
    ([1, 2], "must be a JSON object"),
])
def test_model_config_json_is_checked_without_transformers(tmp_path, shape, message) -> None:
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(shape))
    cfg = RunConfig()
    cfg.model.model_config = str(path)
    with pytest.raises(UserError) as info:
        cfg.validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_valid_model_config_json_passes_with_floats_made_floats(tmp_path) -> None:
    from engine.llama_json import read_llama_json

    path = tmp_path / "llama.json"
    path.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "initializer_range": 0, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    cfg = RunConfig()
    cfg.model.model_config = str(path)
    cfg.validate()
    kwargs = read_llama_json(str(path))
    assert kwargs["initializer_range"] == 0.0 and isinstance(kwargs["initializer_range"], float)
    assert "model_type" not in kwargs and "architectures" not in kwargs


def test_fsdp_refusals_come_before_any_work(tmp_path) -> None:
    from engine.assemble import open_backend
    from engine.backends import has_mlx_lm
    from engine.config import ModelConfig, TrainConfig, check_parallel
    from engine.paths import Layout

    with pytest.raises(UserError, match="train.parallel must be one of ddp, fsdp"):
        RunConfig.from_dict({"train": {"parallel": "zero"}}).validate()
    with pytest.raises(UserError, match="a lora adapter is small: train it with --parallel ddp"):
        check_parallel(ModelConfig(init_from="folder", method="lora"), TrainConfig(parallel="fsdp"))
    with pytest.raises(UserError, match="sample_every does not work with train.parallel fsdp"):
        RunConfig.from_dict({"train": {"parallel": "fsdp", "sample_every": 5}}).validate()
    check_parallel(ModelConfig(init_from="folder", method="full"), TrainConfig(parallel="fsdp"))  # a full fine-tune shards
    # (one process is refused in tests/test_bad_input.py: `--parallel fsdp` there is one of its flags)
    cfg = RunConfig.from_dict({"train": {"parallel": "fsdp", "backend": "mlx", "device": "cpu", "precision": "fp32"}})
    if has_mlx_lm():
        with pytest.raises(UserError, match="the mlx backend does not shard models"):
            open_backend(cfg, Layout(tmp_path))
    assert not any(tmp_path.iterdir())
