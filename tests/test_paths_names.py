"""Names never escape their folder; suggestions follow the documented pattern and skip taken names."""

from __future__ import annotations

import os

import pytest

from engine.control import EngineLock
from engine.errors import UserError
from engine.names import dataset_tag, format_params, suggest_names, taken_names, validate_new_name
from engine.paths import Layout, check_name
from engine.presets import PRESETS, get_preset


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", ".hidden", "x" * 65, "sp ace", "a\\b", "é", "-rf",
                                 "-", "name\n", "x" * 300, None])
def test_bad_names_are_refused(bad) -> None:
    with pytest.raises(UserError) as info:
        check_name(bad)
    assert len(str(info.value)) < 200  # a 300-character name is quoted cut short


def test_layout_resolves_root_from_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PACKTRAIN_HOME", str(tmp_path))
    layout = Layout.resolve()
    assert layout.root == tmp_path.resolve()
    assert layout.cache_dir(512, "fineweb") == tmp_path / "cache" / "packed_sequences" / "512" / "fineweb"
    assert layout.run_log("m", 3) == tmp_path / "training_logs" / "m_run_3.jsonl"
    assert Layout.resolve(tmp_path / "other").root == (tmp_path / "other").resolve()
    with pytest.raises(UserError):
        layout.model_dir("../../etc")


@pytest.mark.parametrize("where", ["model_dir", "run_json", "control_dir", "config_yaml", "console_log",
                                   "engine_pidfile", "latest_pointer"])
def test_every_per_model_path_refuses_an_escaping_name(tmp_path, where: str) -> None:
    layout = Layout.resolve(tmp_path)
    assert getattr(layout, where)("m").is_relative_to(tmp_path)
    for bad in ("../../etc", "a/b", ".."):
        with pytest.raises(UserError):
            getattr(layout, where)(bad)


def test_suggestions_follow_the_seed_pattern(tmp_path) -> None:
    names = suggest_names(415_000_000, "HuggingFaceFW/fineweb", 512)
    assert names == ["415M_FineWeb_512", "experiment_415M_FineWeb_512", "modern_llm_415M", "test_415M"]
    taken = suggest_names(415_000_000, "HuggingFaceFW/fineweb", 512, taken={"415M_FineWeb_512", "test_415M"})
    assert taken[0] == "415M_FineWeb_512_2" and taken[3] == "test_415M_2"
    for name in names:
        check_name(name)


def test_a_name_is_taken_by_a_checkpoint_or_a_live_engine_not_by_a_folder(tmp_path) -> None:
    """One rule for the TUI's naming screen and `train --name`: a folder a run left before its first
    save (or a config the TUI saved) is free; a checkpoint or a live engine takes the name."""
    layout = Layout(tmp_path).ensure()
    (layout.model_dir("died_early") / "control").mkdir(parents=True)
    layout.config_yaml("died_early").write_text("name: died_early\n")
    (layout.model_dir("trained") / "checkpoint_000010").mkdir(parents=True)
    (layout.model_dir("training")).mkdir()
    assert validate_new_name("fresh", layout) == "fresh"
    assert validate_new_name("died_early", layout) == "died_early"
    with pytest.raises(UserError, match="'trained' already exists .* `packtrain-engine resume trained`"):
        validate_new_name("trained", layout)
    with EngineLock(layout, "training").acquire(run=1, log=layout.run_log("training", 1)):
        with pytest.raises(UserError, match=rf"another engine is already training 'training' \(pid {os.getpid()}\)"):
            validate_new_name("training", layout)
        assert taken_names(layout) == {"trained", "training"}
    assert taken_names(layout) == {"trained"}


def test_param_tags_and_dataset_tags() -> None:
    assert format_params(415_123_456) == "415M"
    assert format_params(1_240_000_000) == "1.2B"
    assert format_params(2_000_000_000) == "2B"
    assert dataset_tag("HuggingFaceFW/fineweb-edu") == "FineWebEdu"
    assert dataset_tag("/data/my_corpus.jsonl") == "MyCorpus"


def test_presets_param_counts_match_transformers() -> None:
    """The closed formula the TUI shows must equal what the engine actually builds."""
    transformers = pytest.importorskip("transformers")
    for name in ("tiny", "5M"):
        preset = get_preset(name)
        config = transformers.LlamaConfig(**preset.llama_kwargs(vocab_size=300, seq_len=64))
        model = transformers.LlamaForCausalLM(config)
        assert sum(p.numel() for p in model.parameters()) == preset.n_params(300)
    with pytest.raises(UserError):
        get_preset("nope")
    assert list(PRESETS)[0] == "tiny"
