"""`packtrain-engine info`: the hardware snapshot, its JSON keys and the CUDA/CPU precision logic."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from engine import cli, host
from engine.backends import torch_hardware as hardware
from engine.backends import torch_precision as precision
from engine.paths import Layout

CONTRACT_KEYS = {"device", "device_name", "bf16", "ram_total_gb", "ram_available_gb", "vram_gb", "cpu_count",
                 "torch", "transformers", "python", "root", "disk_free_gb"}


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """engine.cli.main against a fresh root (set through the environment, which is restored after),
    with a fixed precision probe: bf16 at 0.6x fp32, as on a Xeon with AVX512-BF16 and no AMX."""
    monkeypatch.setenv("PACKTRAIN_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "run_probe", lambda device, shape: precision.Measurement(30.0, 50.0))
    return lambda *argv: cli.main(list(argv))


def test_info_json_has_contract_keys(run_cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("info", "--json") == 0
    snap = json.loads(capsys.readouterr().out)
    assert CONTRACT_KEYS <= set(snap)
    assert snap["root"] == str(tmp_path.resolve())
    assert snap["device"] in {"cuda", "mps", "cpu"}
    assert isinstance(snap["bf16"], bool)
    assert (snap["vram_gb"] is None) == (snap["device"] == "cpu")
    assert snap["ram_total_gb"] >= snap["ram_available_gb"] > 0
    assert snap["cpu_count"] >= 1 and snap["disk_free_gb"] > 0
    assert snap["torch"] == torch.__version__
    assert snap["backend"] == "torch" and "not Apple Silicon" in snap["backend_reason"]


def test_info_table_for_humans(run_cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("info") == 0
    out = capsys.readouterr().out
    for label in ("Backend", "Device", "bf16 support", "RAM total", "VRAM", "Disk free", "transformers",
                  "Precision (auto)"):
        assert label in out


def test_info_shows_the_precision_auto_picks_and_the_measurement_behind_it(
        run_cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("info", "--json") == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["precision"] == "fp32"
    assert snap["precision_reason"].startswith("bf16 autocast ran 0.60x fp32 (fp32 30.0 ms, bf16 50.0 ms")
    assert snap["precision_reason"].endswith("measured now on cpu, for the default config")
    assert (tmp_path / "cache" / "precision.json").is_file()
    assert run_cli("info") == 0  # the second time from the cache
    out = capsys.readouterr().out
    assert "Precision (auto)  fp32" in out and "0.60x fp32" in out and "measured earlier on cpu" in out


def test_root_that_does_not_exist_yet_reports_free_disk(tmp_path: Path) -> None:
    snap = hardware.snapshot(Layout.resolve(tmp_path / "not" / "yet"))
    assert snap["disk_free_gb"] > 0


def test_cuda_path_reports_device_vram_and_bf16(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    props = types.SimpleNamespace(name="Fake GPU", total_memory=8 << 30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    snap = hardware.snapshot(Layout.resolve(tmp_path))
    assert (snap["device"], snap["device_name"], snap["vram_gb"], snap["bf16"], snap["device_count"]) == \
        ("cuda", "Fake GPU", 8.0, False, 2)


@pytest.mark.parametrize(("flags", "capability", "expected"), [
    ("fpu sse avx2 avx512f avx512_bf16", "AVX512", True),
    ("fpu sse avx2 amx_bf16 amx_tile", "AVX2", True),
    ("fp asimd bf16", "DEFAULT", True),
    ("fpu sse avx2 avx512f", "AVX512", True),
    ("fpu sse avx2", "AVX2", False),
])
def test_cpu_bf16_from_flags_and_capability(monkeypatch: pytest.MonkeyPatch, flags: str, capability: str,
                                            expected: bool) -> None:
    monkeypatch.setattr(host, "cpuinfo", lambda *keys: flags if "flags" in keys else None)
    monkeypatch.setattr(hardware, "_cpu_capability", lambda: capability)
    assert hardware._cpu_bf16() is expected


@pytest.mark.parametrize("argv, message", [
    (["cache", "build", "--seq-len", "abc"], "error: argument --seq-len: invalid int value: 'abc' "
                                             "(see packtrain-engine cache build --help)"),
    (["bogus"], "error: argument COMMAND: invalid choice: 'bogus'"),
    (["checkpoints", "delete"], "error: the following arguments are required: ID"),
    (["info", "--what"], "error: unrecognized arguments: --what (see packtrain-engine --help)"),
])
def test_usage_mistakes_are_one_error_line(run_cli, capsys: pytest.CaptureFixture[str], argv: list[str],
                                           message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        run_cli(*argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err


def test_the_tui_launcher_reports_usage_mistakes_the_same_way(capsys: pytest.CaptureFixture[str]) -> None:
    from app.main import main

    with pytest.raises(SystemExit) as exited:
        main(["--bogus"])
    assert exited.value.code == 2 and capsys.readouterr().err == "error: unrecognized arguments: --bogus (see packtrain --help)\n"


@pytest.mark.parametrize("error, line", [
    (lambda d: NotADirectoryError(20, "Not a directory", str(d / "a_file" / "checkpoints" / "m")),
     "error: {d}/a_file is a file where a folder is needed"),
    (lambda d: FileExistsError(17, "File exists", str(d / "a_file")), "error: {d}/a_file is a file where a folder is needed"),
    (lambda d: OSError(28, "No space left on device", str(d / "x")), "error: No space left on device: {d}/x"),
])
def test_a_filesystem_refusal_is_one_error_line(run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], error, line: str) -> None:
    from engine.commands import info

    (tmp_path / "a_file").write_text("x")

    def refuse(args: object) -> int:
        raise error(tmp_path)

    monkeypatch.setattr(info, "run_info", refuse)
    assert run_cli("info") == 1
    assert capsys.readouterr().err == line.format(d=tmp_path) + "\n"


@pytest.mark.parametrize("argv", [["info"], ["cache", "list"], ["checkpoints", "list"], ["checkpoints", "list", "--json"]])
def test_a_root_that_is_a_file_is_refused_by_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          argv: list[str]) -> None:
    (tmp_path / "a_file").write_text("x")
    for root in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        assert cli.main(["--root", str(root), *argv]) == 2
        assert capsys.readouterr().err == (f"error: cannot use {root} as the data root: {tmp_path / 'a_file'} "
                                           "is a file, not a folder\n")


def test_a_name_too_long_for_the_filesystem_is_one_short_line(run_cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("cache", "info", "a" * 300) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: name too long for the filesystem: 'aaaa") and err.count("\n") == 1 and len(err) < 200
