"""Reading a file the user names (a run config, a model config): one line for every way it can fail.

Such a file is small text. A FIFO or /dev/zero would block or never end, a binary file fails to
decode, a huge one is a mistake: each is refused with its own line before anything is parsed.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import UserError, shown

MAX_BYTES = 1 << 20  # a run or model config is a few hundred bytes
MAX_PATH = 4096  # Linux's PATH_MAX: anything longer is not a path the filesystem can open


def read_user_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of the regular file `path`; `what` names it in the error ('config')."""
    if len(str(path)) > MAX_PATH:
        raise UserError(f"{what} path {shown(str(path))} is longer than {MAX_PATH:,} characters")
    p = Path(path)
    try:
        if p.exists() and not p.is_file():
            raise UserError(f"{what} {p} is not a regular file")
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise UserError(f"{what} {p} is larger than {MAX_BYTES // 1024:,} KiB; is it the right file?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p} is not UTF-8 text (byte {e.start:,} cannot be decoded)") from None
