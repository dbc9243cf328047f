"""The layers of README's Architecture section, as import-linter contracts (pyproject.toml): the
framework-free engine and the TUI import neither torch nor mlx, and each backend only its own."""

from __future__ import annotations

import subprocess
import sys

from tests.train_support import REPO


def test_import_contracts_hold() -> None:
    done = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports; "
                           "raise SystemExit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
