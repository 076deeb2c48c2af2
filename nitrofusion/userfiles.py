"""Reading the text files a user points us at (prompt lists, config files) without surprises.

A path to a device (/dev/zero, /dev/stdin), a FIFO or a multi-gigabyte file would hang or eat
the machine's memory; bytes that are not UTF-8 would raise deep inside a parser. Each is a
one-line UserError here instead.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nitrofusion.errors import UserError

MAX_TEXT_BYTES = 64 * 2**20  # far above any prompt list or config file


def read_user_text(path: str | Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}': {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{what} '{path}' is not a regular file")
    if info.st_size > max_bytes:
        raise UserError(f"{what} '{path}' is {info.st_size} bytes; more than {max_bytes} is not a {what}")
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}': {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {exc.start})") from None
