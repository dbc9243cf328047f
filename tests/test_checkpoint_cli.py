"""`packtrain-engine checkpoints list|delete|export`: output, deletion, refusals and their one-line errors."""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import catalog, protocol
from engine.checkpoint import EXPORT_MARKER, Checkpointer
from engine.control import EngineLock
from engine.paths import Layout
from test_checkpoint import of, trained_once, trainer_state
from test_cli_info import run_cli  # noqa: F401 - fixture


@pytest.fixture
def layout(tmp_path: Path, run_cli) -> Layout:  # noqa: F811 - run_cli points PACKTRAIN_HOME here first
    """`alpha` with steps 1..4 (latest 4, step 1 torn) and `beta` with step 7."""
    layout = Layout.resolve(tmp_path)
    model, opt = trained_once()
    alpha = Checkpointer(layout, "alpha", keep_last=5)
    for step in (1, 2, 3, 4):
        alpha.save(step=step, backend=of(model, opt), trainer_state=trainer_state(step))
    (alpha.dir / "checkpoint_000001" / "MANIFEST.json").unlink()
    Checkpointer(layout, "beta").save(step=7, backend=of(model), optimizer=False, trainer_state=trainer_state(7))
    return layout


def names(layout: Layout) -> list[str]:
    return [e.display_name for e in catalog.list_checkpoints(layout)]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_list_json_and_table(layout: Layout, run_cli, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert run_cli("checkpoints", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["display_name"] for e in listed] == names(layout)
    assert set(listed[0]) >= {"model", "step", "run", "display_name", "path", "loss", "eval_loss", "saved_at",
                              "dataset", "sequences", "size_bytes", "valid", "reason", "is_latest", "running"}
    assert run_cli("checkpoints", "list") == 0
    out = capsys.readouterr().out
    assert "beta_checkpoint_7_run_1" in out and "latest" in out and "invalid: MANIFEST.json is missing" in out


def test_list_empty_root(tmp_path: Path, run_cli, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert run_cli("checkpoints", "list") == 0
    assert capsys.readouterr().out.startswith("No checkpoints in ")


def test_delete_by_name_and_path_with_yes(layout: Layout, run_cli, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    two = layout.checkpoint_dir("alpha", 2)
    assert run_cli("checkpoints", "delete", "alpha_checkpoint_3_run_1", str(two), "--yes") == 0
    out = capsys.readouterr().out
    assert "Deleted alpha_checkpoint_3_run_1" in out and "Deleted alpha_checkpoint_2_run_1" in out
    assert names(layout) == ["beta_checkpoint_7_run_1", "alpha_checkpoint_4_run_1", "alpha_checkpoint_1_run_1"]
    assert not [p for p in layout.model_dir("alpha").iterdir() if p.name.startswith(".tmp")]


def test_deleting_latest_repoints_to_newest_valid(layout: Layout, run_cli, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert run_cli("checkpoints", "delete", "alpha/checkpoint_000004", "alpha_checkpoint_3_run_1", "-y") == 0
    assert catalog.read_latest(layout, "alpha") == "checkpoint_000002"  # step 1 is torn, so not 1
    assert "alpha: latest is now checkpoint_000002" in capsys.readouterr().out
    assert run_cli("checkpoints", "delete", "alpha_checkpoint_2_run_1", "alpha_checkpoint_1_run_1", "--yes") == 0
    assert not layout.latest_pointer("alpha").exists()
    assert "alpha: no checkpoints left" in capsys.readouterr().out


def test_refuses_latest_of_a_live_engine_but_not_older_ones(layout: Layout, run_cli,  # noqa: F811
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with EngineLock(layout, "alpha").acquire(run=2, log=layout.run_log("alpha", 2)):
        assert run_cli("checkpoints", "delete", "alpha_checkpoint_2_run_1", "alpha_checkpoint_4_run_1", "--yes") == 2
        assert "latest checkpoint of a live engine" in one_error_line(capsys)
        assert len(names(layout)) == 5  # a refused command deletes nothing, not even the allowed one
        assert run_cli("checkpoints", "delete", "alpha_checkpoint_2_run_1", "--yes") == 0
    assert "alpha_checkpoint_2_run_1" not in names(layout)


@pytest.mark.parametrize("as_path", [False, True])
def test_refuses_the_checkpoint_a_live_engine_resumed_from(layout: Layout, run_cli, as_path: bool,  # noqa: F811
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    ref = str(layout.checkpoint_dir("alpha", 3)) if as_path else "alpha_checkpoint_3_run_1"
    log = layout.run_log("alpha", 2)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(protocol.encode(protocol.RunStarted(model="alpha", run=2, start_step=3, resumed_from=ref)) + "\n")
    with EngineLock(layout, "alpha").acquire(run=2, log=log):
        assert run_cli("checkpoints", "delete", "alpha/checkpoint_000003", "--yes") == 2
        assert "resumed from it" in one_error_line(capsys)
    assert "alpha_checkpoint_3_run_1" in names(layout)


def test_refuses_while_an_engine_is_starting(layout: Layout, run_cli, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    fd = os.open(layout.engine_lock("alpha"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # lock taken, engine.json not written yet
        assert run_cli("checkpoints", "delete", "alpha_checkpoint_2_run_1", "--yes") == 2
        assert "starting" in one_error_line(capsys)
    finally:
        os.close(fd)


def test_asks_first_and_refuses_without_a_terminal(layout: Layout, run_cli, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # piped input is not consent
    assert run_cli("checkpoints", "delete", "alpha_checkpoint_2_run_1") == 2
    assert "without --yes" in one_error_line(capsys)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty("n\n"))
    assert run_cli("checkpoints", "delete", "alpha_checkpoint_2_run_1") == 1
    assert "Nothing deleted." in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", Tty("y\n"))
    assert run_cli("checkpoints", "delete", "alpha_checkpoint_2_run_1") == 0
    assert "Freed" in capsys.readouterr().out and "alpha_checkpoint_2_run_1" not in names(layout)


def test_refuses_anything_outside_checkpoints(layout: Layout, tmp_path: Path, run_cli,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "elsewhere" / "alpha" / "checkpoint_000002"
    outside.mkdir(parents=True)
    link = layout.model_dir("alpha") / "checkpoint_000009"
    os.symlink(outside, link)
    for ref in (str(outside), str(link), str(layout.model_dir("alpha")), "alpha/checkpoint_000002/../../..",
                str(layout.model_dir("alpha") / "latest"), "no_such_checkpoint_5_run_1", "nothing/here"):
        assert run_cli("checkpoints", "delete", ref, "--yes") == 2, ref
        assert one_error_line(capsys)
    assert outside.is_dir() and link.is_symlink() and len(names(layout)) == 5


def test_interrupted_delete_leaves_no_half_checkpoint(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog.shutil, "rmtree", lambda *a, **k: None)  # killed right after the rename
    catalog.remove_checkpoint_dir(layout.checkpoint_dir("alpha", 2))
    monkeypatch.undo()
    leftovers = [p for p in layout.model_dir("alpha").iterdir() if p.name.startswith(catalog.DELETE_PREFIX)]
    assert len(leftovers) == 1 and "alpha_checkpoint_2_run_1" not in names(layout)
    Checkpointer(layout, "alpha")
    assert not leftovers[0].exists()


def test_export_command(layout: Layout, tmp_path: Path, run_cli, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert run_cli("checkpoints", "export", "alpha_checkpoint_4_run_1", str(tmp_path / "hf")) == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors"]
    assert run_cli("checkpoints", "export", "alpha/checkpoint_000001", str(tmp_path / "hf2")) == 2
    assert "MANIFEST.json is missing" in one_error_line(capsys)


def test_export_refusals_are_one_line_and_leave_nothing(layout: Layout, tmp_path: Path, run_cli,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("x")
    ckpt = layout.checkpoint_dir("alpha", 4)
    cases = [
        (tmp_path / "a_file" / "out", f"{tmp_path / 'a_file'} is a file, not a folder"),
        (tmp_path / "a_file" / "deep" / "out", f"{tmp_path / 'a_file'} is a file, not a folder"),
        (Path("/proc/packtrain-nowhere/out"), "cannot export to /proc/packtrain-nowhere/out: "),
        (ckpt / "inside", f"refusing to export into {layout.checkpoints_root}"),
        (layout.model_dir("alpha") / "checkpoint_000009", f"refusing to export into {layout.checkpoints_root}"),
        (layout.cache_root / "x", f"refusing to export into {layout.cache_root}"),
    ]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for out, message in cases:
        assert run_cli("checkpoints", "export", "alpha_checkpoint_4_run_1", str(out)) == 2
        assert message in one_error_line(capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_export_removes_only_its_own_killed_temporaries(layout: Layout, tmp_path: Path, run_cli,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A killed export of the same name leaves `.tmp-hf-<8 hex>` with our marker (or nothing, when
    killed before the marker): those go. A user's own folders of similar names stay, contents intact."""
    parent = tmp_path / "new"
    killed = parent / ".tmp-hf-0badc0de"
    killed.mkdir(parents=True)
    (killed / EXPORT_MARKER).touch()
    (killed / "model.safetensors").write_bytes(b"half")
    (parent / ".tmp-hf-12345678").mkdir()  # killed between mkdir and the marker: empty
    users = [parent / ".tmp-hf-backup", parent / ".tmp-hf-0badc0de1", parent / ".tmp-hf-abcdef12",
             parent / ".tmp-hf2-0badc0de", parent / ".tmp-other-0badc0de"]
    for folder in users:  # `.tmp-hf-abcdef12` has our name pattern but no marker and holds files
        folder.mkdir()
        (folder / "mine.txt").write_text("keep me")
    assert run_cli("checkpoints", "export", "alpha_checkpoint_4_run_1", str(parent / "hf")) == 0
    assert sorted(os.listdir(parent)) == sorted(["hf", *(f.name for f in users)])
    assert all((f / "mine.txt").read_text() == "keep me" for f in users)
    assert sorted(os.listdir(parent / "hf")) == ["config.json", "generation_config.json", "model.safetensors"]


def test_export_leaves_a_users_tmp_backup_beside_the_target(layout: Layout, tmp_path: Path, run_cli) -> None:  # noqa: F811
    backup = tmp_path / ".tmp-mymodel-backup"
    backup.mkdir()
    (backup / "weights.bin").write_bytes(b"precious")
    assert run_cli("checkpoints", "export", "alpha_checkpoint_4_run_1", str(tmp_path / "mymodel")) == 0
    assert (backup / "weights.bin").read_bytes() == b"precious"


@pytest.mark.parametrize("name", ["*", "a?", "[ab]", "x\nrm", "tab\there"])
def test_export_refuses_glob_and_control_characters_in_the_name(layout: Layout, tmp_path: Path, run_cli, name: str,  # noqa: F811
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for other in (".tmp-a-b", ".tmp-x-0badc0de", ".tmp-*-12345678"):
        (out / other).mkdir()
        (out / other / "f").write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert run_cli("checkpoints", "export", "alpha_checkpoint_4_run_1", str(out / name)) == 2
    assert "choose a plain folder name" in one_error_line(capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_list_and_delete_do_not_import_torch(layout: Layout) -> None:
    code = ("import sys; from engine import cli\n"
            "assert cli.main(['checkpoints', 'list']) == 0\n"
            "assert cli.main(['checkpoints', 'delete', 'beta_checkpoint_7_run_1', '--yes']) == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], env=os.environ | {"PACKTRAIN_HOME": str(layout.root)})
    assert proc.returncode == 0, proc.stderr
    assert "beta_checkpoint_7_run_1" not in names(layout)


def test_narrow_terminals_drop_columns_before_cutting_names() -> None:
    from engine.commands.checkpoints import DROP_ORDER
    from engine.commands.tables import fit_columns

    row = {"Checkpoint": "5M_Stdlib_256_checkpoint_300_run_1", "Step": "300", "Loss": "2.500", "Eval": "2.700",
           "BPB": "1.234", "Saved": "11-14 22:18", "Dataset": "stdlib", "Seqs": "1,234", "Size": "1.2 MiB",
           "Status": "latest"}
    assert fit_columns([row], 1000, DROP_ORDER) == list(row)
    assert fit_columns([row], 80, DROP_ORDER) == ["Checkpoint", "Step", "Loss", "Size", "Status"]
    assert fit_columns([row], 40, DROP_ORDER) == ["Checkpoint", "Step", "Status"]


def test_a_trainer_state_of_the_wrong_shape_lists_and_resolves_as_shown(layout: Layout, run_cli,  # noqa: F811
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Valid JSON with wrong types: the table still prints (no traceback), and the display name it
    shows for the checkpoint is the name delete and export accept."""
    path = layout.checkpoint_dir("alpha", 3) / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(run="first", loss="low", saved_at="yesterday",
                 cache={"dataset_name": ["a", "b"], "total_sequences": "many"})
    path.write_text(json.dumps(state))
    assert run_cli("checkpoints", "list") == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "alpha_checkpoint_3_" in line)
    assert row.split()[0] == "alpha_checkpoint_3_run_0" and "many" not in row and "['a'" not in row
    assert run_cli("checkpoints", "delete", "alpha_checkpoint_3_run_1", "--yes") == 2
    assert "was saved by run 0" in one_error_line(capsys)
    assert run_cli("checkpoints", "delete", "alpha_checkpoint_3_run_0", "--yes") == 0
    assert "alpha_checkpoint_3_run_0" not in names(layout)
