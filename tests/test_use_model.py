"""eval, generate, chat and compare on a tiny trained model: metrics checked by hand, exact greedy
interop with transformers and mlx-lm on the export, reproducible sampling, and every refusal."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import cli, eval_data, eval_log, evaluate, generate, inference
from engine import protocol as P
from engine.cache.build import build_cache
from engine.catalog import MANIFEST, read_manifest
from engine.chat import Chat
from engine.config import DataConfig
from engine.paths import Layout
from tests.train_support import build_tiny_cache, data_flags, run_engine, train_flags, write_corpus
from tests.use_support import bytes_tokenizer_folder, hf_tokenizer_folder, make_checkpoint

pytestmark = pytest.mark.slow

LAST = "tiny_checkpoint_60_run_1"
FIRST = "tiny_checkpoint_30_run_1"
CONTEXT = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny`, trained 60 steps on a byte-level cache (seq_len 32), saved and evaluated every 30."""
    root = tmp_path_factory.mktemp("use")
    corpus = write_corpus(root)
    build_tiny_cache(root, corpus)
    done = run_engine(root, "train", "--name", "tiny", *data_flags(corpus),
                      *train_flags(max_steps=60, save_interval=30, eval_interval=30))
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def run(root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PACKTRAIN_HOME", str(root))
    return lambda *argv: cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def loaded(root: Path) -> inference.LoadedModel:
    return inference.load(Layout.resolve(root), LAST)


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def greedy(run, capsys: pytest.CaptureFixture[str], prompt: str, *extra: str, ref: str = LAST) -> str:
    assert run("generate", ref, "--prompt", prompt, "--temperature", "0", *extra) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


# --- eval ----------------------------------------------------------------------------------------


def test_eval_matches_the_runs_own_eval_and_a_plain_per_token_loop(root: Path, loaded: inference.LoadedModel) -> None:
    layout = Layout.resolve(root)
    count, batch = eval_data.plan(loaded, layout, None)
    data = eval_data.select(loaded, layout, count)
    m = evaluate.evaluate(loaded, data.rows, batch)
    assert (count, batch, m.tokens) == (16, 4, 16 * CONTEXT)
    assert m.loss == pytest.approx(loaded.state["eval_loss"], rel=1e-6)  # what the trainer measured at step 60

    nats, top1, top5, n_bytes = 0.0, 0, 0, 0
    with torch.no_grad():
        for row in data.rows:
            logits = loaded.model(input_ids=torch.tensor(row[None, :-1])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t, target in enumerate(row[1:].tolist()):
                nats -= logp[t, target].item()
                ranked = torch.argsort(logits[t], descending=True).tolist()
                top1 += ranked[0] == target
                top5 += target in ranked[:5]
                n_bytes += target < 256  # `bytes`: ids 0..255 are one byte each; 256 is the EOS between documents
    assert 0 < n_bytes < m.tokens  # some targets are EOS: their loss counts, their bytes do not
    assert m.bytes == n_bytes
    assert m.nats == pytest.approx(nats, rel=1e-6)
    assert m.bpb == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)
    assert (m.top1_hits, m.top5_hits) == (top1, top5)
    assert m.perplexity == pytest.approx(math.exp(m.loss))


def test_eval_cli_keeps_its_result_outside_the_checkpoint_and_lists_it(root: Path, run, capsys) -> None:
    assert run("eval", FIRST, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == FIRST and result["data_kind"] == "held-out"
    assert result["tokens"] == 16 * CONTEXT and result["tokens_per_sec"] > 0 and 0 <= result["top1"] <= result["top5"]
    folder = root / "checkpoints" / "tiny" / "checkpoint_000030"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*read_manifest(folder), MANIFEST])

    layout = Layout.resolve(root)
    stale = P.decode({**result, "loss": 99.0, "weights": "xxh3_64:other", "ts": 2e9})
    eval_log.append(layout, "tiny", stale)  # newer, but of other weights saved under the same name
    assert run("checkpoints", "list", "--json") == 0
    listed = {e["display_name"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed[FIRST]["kept_eval"]["loss"] == pytest.approx(result["loss"], rel=1e-12)
    assert run("checkpoints", "list") == 0
    table = capsys.readouterr().out
    assert "BPB" in table and f"{result['bpb']:.3f}" in table


def test_eval_on_a_source_equals_eval_on_its_cache(root: Path, run, capsys) -> None:
    assert run("eval", LAST, "--source", root / "docs.jsonl", "--batches", 2, "--json") == 0
    source = json.loads(capsys.readouterr().out)
    assert run("eval", LAST, "--cache", "32/docs", "--batches", 2, "--json") == 0
    cache = json.loads(capsys.readouterr().out)
    assert (source["data_kind"], cache["data_kind"]) == ("source", "cache")
    assert source["tokens"] == cache["tokens"] == 2 * 4 * CONTEXT
    assert source["loss"] == pytest.approx(cache["loss"], rel=1e-9) and source["bytes"] == cache["bytes"]


def test_eval_refuses_a_cache_of_another_tokenizer_and_accepts_the_same_one_saved_again(root: Path, run, capsys) -> None:
    layout = Layout.resolve(root)
    flags = {"source": str(root / "docs.jsonl"), "seq_len": CONTEXT, "docs_per_chunk": 40, "max_chunks": 1}
    other = build_cache(DataConfig(dataset_name="bpe", tokenizer="bpe:300", **flags), layout, workers=1)
    assert run("eval", LAST, "--cache", other) == 2
    assert "was built with another tokenizer (bpe:300)" in error_line(capsys)
    resaved = build_cache(DataConfig(dataset_name="resaved", tokenizer=str(root / "checkpoints/tiny/checkpoint_000060"),
                                     **flags), layout, workers=1)
    assert run("eval", LAST, "--cache", resaved, "--batches", 1, "--json") == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 4 * CONTEXT


# --- generate ------------------------------------------------------------------------------------


def test_greedy_generate_equals_transformers_on_the_export(root: Path, run, capsys, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt, n = "doc 7: the cat", 16
    ours = greedy(run, capsys, prompt, "--max-new-tokens", n)
    assert run("checkpoints", "export", LAST, tmp_path / "hf") == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    # EOS is given explicitly: the exported config's own ids are LlamaConfig placeholders
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] - ids.shape[1] == n  # ran to length: the whole text is compared
    assert ours == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm is not installed (pip install -e '.[mlx]')")
def test_mlx_lm_loads_the_export_with_the_same_logits_and_greedy_tokens(root: Path, run, tmp_path: Path,
                                                                        loaded: inference.LoadedModel) -> None:
    import mlx.core as mx
    from mlx_lm import load as mlx_load
    from mlx_lm import stream_generate

    ids, n = generate.encode(loaded, "doc 9: a dog"), 12
    assert run("checkpoints", "export", LAST, tmp_path / "hf") == 0
    model, tokenizer = mlx_load(str(tmp_path / "hf"))
    theirs = np.array(model(mx.array([ids])).astype(mx.float32))
    with torch.no_grad():
        reference = loaded.model(input_ids=torch.tensor([ids])).logits.numpy()
    assert theirs.shape == reference.shape
    np.testing.assert_allclose(theirs, reference, atol=2e-2 * float(np.abs(reference).max()))
    ours = generate.sample(loaded, ids, P.SamplingParams(temperature=0), 0, n, on_text=lambda text: None).ids
    assert [r.token for r in stream_generate(model, tokenizer, prompt=ids, max_tokens=n)] == ours


def test_the_same_seed_gives_the_same_text(loaded: inference.LoadedModel) -> None:
    ids = generate.encode(loaded, "doc 3:")
    params = P.SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1,
                              num_samples=2, seed=11)

    def texts(p: P.SamplingParams) -> list[str]:
        return [s.text for s in generate.run(loaded, ids, p, emit=lambda e: None)]

    first = texts(params)
    assert texts(params) == first and first[0] != first[1]
    assert texts(dataclasses.replace(params, seed=12, num_samples=1)) == [first[1]]  # sample i is seeded seed + i


def test_generation_feeds_one_new_token_per_step_through_the_kv_cache(loaded: inference.LoadedModel) -> None:
    assert json.loads((loaded.path / "config.json").read_text())["use_cache"] is False  # saved for training
    seen: list[int] = []
    hook = loaded.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        ids = generate.encode(loaded, "doc 8: the")
        generate.sample(loaded, ids, P.SamplingParams(temperature=0), 0, 5, on_text=lambda text: None)
    finally:
        hook.remove()
    assert seen == [len(ids), 1, 1, 1, 1]  # the prompt once, then only the newest token


def test_events_stream_the_text_and_a_stop_string_ends_it(run, capsys) -> None:
    whole = greedy(run, capsys, "doc 5:", "--max-new-tokens", 20)
    stop = whole[6:8]
    assert run("generate", LAST, "--prompt", "doc 5:", "--temperature", "0", "--max-new-tokens", 20, "--stop", stop,
               "--events") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(e["v"] == P.SCHEMA_VERSION for e in events)
    assert [e["event"] for e in events[:2]] == ["model_loaded", "generation_started"]
    done = events[-1]
    assert done["event"] == "generation_done" and done["reason"] == "stop"
    assert done["text"] == whole[:whole.index(stop)]
    assert "".join(e["text"] for e in events if e["event"] == "token") == done["text"]


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(run, capsys) -> None:
    prompt = "doc 1: " + "the cat sat on a mat " * 4
    assert run("generate", LAST, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", 8, "--events") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    started = next(e for e in events if e["event"] == "generation_started")
    assert (started["prompt_tokens"], started["prompt_dropped"]) == (CONTEXT - 8, len(prompt) - (CONTEXT - 8))
    assert any(e["event"] == "warning" and f"kept its last {CONTEXT - 8}" in e["message"] for e in events)
    assert events[-1]["text"] == greedy(run, capsys, prompt[-(CONTEXT - 8):], "--max-new-tokens", 8)
    assert run("generate", LAST, "--prompt", prompt, "--max-new-tokens", 8) == 0
    assert capsys.readouterr().err.startswith("warning: the prompt is ")


@pytest.mark.parametrize("args, message", [
    (("generate", "nope"), "no checkpoint 'nope'"),
    (("generate", LAST, "--top-p", "0"), "--top-p must be in (0, 1], got 0.0"),
    (("generate", LAST, "--top-p", "1.5"), "--top-p must be in (0, 1]"),
    (("generate", LAST, "--temperature", "-0.5"), "--temperature must be a number >= 0"),
    (("generate", LAST, "--top-k", "0"), "--top-k must be a whole number >= 1"),
    (("generate", LAST, "--num-samples", "0"), "--num-samples must be in 1..100"),
    (("generate", LAST, "--max-new-tokens", str(CONTEXT)), f"leaves no room for a prompt in the model's context of {CONTEXT}"),
    (("eval", LAST, "--batches", "0"), "--batches must be at least 1"),
    (("eval", "tiny_checkpoint_60_run_2"), "was saved by run 1"),
])
def test_bad_input_is_one_error_line(run, capsys, args: tuple[str, ...], message: str) -> None:
    assert run(*args) == 2
    assert message in error_line(capsys)


def test_with_events_progress_results_and_refusals_are_json_lines(run, capsys) -> None:
    assert run("eval", LAST, "--batches", 2, "--events") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["model_loaded", "eval_progress", "eval_progress", "eval_result"]
    assert events[-1]["tokens"] == 2 * 4 * CONTEXT
    assert run("generate", "nope", "--events") == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["event"] == "error" and err.startswith("error: no checkpoint 'nope'")


def test_a_prompt_file_that_is_not_utf8_is_refused(run, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "prompt.txt"
    bad.write_bytes("café".encode("latin-1"))
    assert run("generate", LAST, "--prompt-file", bad) == 2
    assert "is not UTF-8 text" in error_line(capsys)
    bad.write_text("doc 4: the", encoding="utf-8")
    assert run("generate", LAST, "--prompt-file", bad, "--temperature", "0", "--max-new-tokens", 4) == 0
    assert capsys.readouterr().out[:-1] == greedy(run, capsys, "doc 4: the", "--max-new-tokens", 4)


def test_a_corrupt_checkpoint_is_refused(root: Path, run, capsys) -> None:
    broken = root / "checkpoints" / "broken" / "checkpoint_000060"
    shutil.copytree(root / "checkpoints" / "tiny" / "checkpoint_000060", broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    for command in ("eval", "generate", "serve-model"):
        assert run(command, "broken_checkpoint_60_run_1") == 2
        assert "model.safetensors is corrupt (hash mismatch)" in error_line(capsys)
    assert run("generate", "broken") == 2
    assert "model 'broken' has no valid checkpoint (1 failed their check)" in error_line(capsys)
    shutil.rmtree(broken.parent)


# --- compare and chat ----------------------------------------------------------------------------


def test_compare_evaluates_the_same_tokens_then_samples_with_one_seed(root: Path, run, capsys,
                                                                      loaded: inference.LoadedModel) -> None:
    assert run("compare", FIRST, LAST, "--json", "--seed", 4, "--max-new-tokens", 6, "--prompt", "doc 2:") == 0
    report = json.loads(capsys.readouterr().out)
    first, last = report["results"]
    assert (first["step"], last["step"]) == (30, 60) and first["tokens_seen"] < last["tokens_seen"]
    assert first["data"] == last["data"] == report["data"] and first["tokens"] == last["tokens"] == 16 * CONTEXT
    assert last["loss"] == pytest.approx(loaded.state["eval_loss"], rel=1e-6) and first["loss"] > last["loss"]
    for sample in report["samples"]:
        assert run("generate", sample["checkpoint"], "--prompt", "doc 2:", "--seed", 4, "--max-new-tokens", 6) == 0
        assert capsys.readouterr().out[:-1] == sample["text"]
    assert run("compare", FIRST, LAST, "--seed", 4, "--max-new-tokens", 6) == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("BPB", "Top-5", FIRST, LAST, "seed 4"))


def test_chat_continues_the_transcript_of_a_base_model(run, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("doc 1: the\ndoc 2:\n/reset\ndoc 2:\n"))
    assert run("chat", LAST, "--temperature", "0", "--max-new-tokens", 6, "--stop", "\n") == 0
    first, second, after_reset = capsys.readouterr().out.splitlines()
    assert first == greedy(run, capsys, "doc 1: the", "--max-new-tokens", 6, "--stop", "\n")
    assert second == greedy(run, capsys, f"doc 1: the{first}\ndoc 2:", "--max-new-tokens", 6, "--stop", "\n")
    assert after_reset == greedy(run, capsys, "doc 2:", "--max-new-tokens", 6, "--stop", "\n")


def test_chat_uses_the_tokenizers_chat_template(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout.resolve(tmp_path)
    make_checkpoint(layout, "templated", hf_tokenizer_folder(tmp_path / "hf"), context=64)
    make_checkpoint(layout, "base", bytes_tokenizer_folder(tmp_path / "bytes"), context=64)
    chat = Chat(inference.load(layout, "templated"))
    def encoded(text: str) -> list[int]:
        return chat.loaded.tokenizer(text, add_special_tokens=False).input_ids

    assert chat.prompt_ids("hi") == encoded("<|user|>hi</s><|assistant|>")
    chat.answered("yo")
    assert chat.prompt_ids("again") == encoded("<|user|>hi</s><|assistant|>yo</s><|user|>again</s><|assistant|>")
    assert not Chat(inference.load(layout, "base")).loaded.has_chat_template
    monkeypatch.setenv("PACKTRAIN_HOME", str(tmp_path))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert cli.main(["chat", "templated", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    assert "Loaded templated_checkpoint_1_run_1" in capsys.readouterr().err
