"""The files a user points us at and the files we leave them, without surprises.

Reading: a path to a device (/dev/zero, /dev/stdin), a FIFO or a multi-gigabyte file would hang
or eat the machine's memory; bytes that are not UTF-8 would raise deep inside a parser. Each is
a one-line UserError here instead. Writing: a report, config or image is written beside its
name and renamed onto it, so a crash leaves the old file or the new one, never half of one; a
pipeline folder is filled beside its name and swapped in the same way.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from nitrofusion.errors import UserError, first_line

if TYPE_CHECKING:
    from PIL import Image

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
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {exc.start})") from None
    # Windows editors start UTF-8 files with a byte order mark: left in, it became part of the first
    # prompt, of a CSV's first column name (its 'prompt' column then not found) or broke JSON. Removed
    # after decoding, not by the utf-8-sig codec, whose error offsets would not count the mark.
    return text.removeprefix("\ufeff")


def read_user_image(path: str | Path, what: str = "image", hint: str = "") -> Image.Image:
    """An image file as RGB, read whole; a damaged one (truncated, not an image, a decompression
    bomb) is one line naming it: PIL's own message for a truncated file names no file, and among
    thousands of reference images the user could not tell which one is bad."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise UserError(f"cannot read {what} '{path}': {reason}{hint}") from None


def check_writable_folder(path: str | Path, what: str) -> Path:
    """`path` can be made or written into as a folder, checked before any work and creating
    nothing: a refused run leaves no empty folder behind."""
    if not str(path).strip():  # Path("") would be the working directory
        raise UserError(f"{what} is empty: name a folder")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create {what} '{path}': '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{path}' is not writable")
    return path


def plain_permissions(path: str | Path) -> None:
    """Give `path` (and all under it, a folder) the permissions a plainly created file or folder has
    under the umask (0644 / 0755 under 022). safetensors writes its files 0600 and mkdtemp makes
    0700 folders: students, pair shards and checkpoints were unreadable to the user's group."""
    mask = os.umask(0o022)
    os.umask(mask)
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to, the writer's own; on success it is flushed to
    disk and renamed onto `path` (with the permissions the umask gives a new file), on an error it
    is removed."""
    path = Path(path)
    tmp = _own_temporary(path)
    try:
        yield tmp
        _finish(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _own_temporary(path: Path) -> Path:
    """An empty file beside `path` (hidden, `.NAME.<random>.tmp`) that no other writer has."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _finish(tmp: Path) -> None:
    """A written temporary file flushed to disk and given a plain file's permissions, before it is
    renamed (or linked) to its name: unflushed, a power cut could leave that name empty or short."""
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    plain_permissions(tmp)


def write_new(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a new file through `write(tmp)` and give it `path`, or `stem-2.ext`, `stem-3.ext`, ...:
    the first name no file has, claimed at the moment it is taken. Checked only beforehand, two runs
    writing into one folder (two `generate` at the same prompt and seed) took the same name, and
    one image replaced the other. The temporary file is the writer's own, never another's."""
    path = Path(path)
    tmp = _own_temporary(path)
    try:
        write(tmp)
        _finish(tmp)
        n = 1
        while True:
            candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            if not candidate.exists() and _claim(tmp, candidate):
                return candidate
            n += 1
    finally:
        tmp.unlink(missing_ok=True)


def _claim(tmp: Path, path: Path) -> bool:
    """Give the written `tmp` the name `path` if no file has it: a hard link fails where the name is
    taken. Where the file system has no hard links, the name is claimed by an exclusive create and
    the file renamed onto it."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        os.replace(tmp, path)
        return True


@contextmanager
def folder_lock(folder: str | Path, what: str, enabled: bool = True) -> Iterator[None]:
    """Hold `folder/.lock` for the duration: a second run in the same folder (a `--resume latest`
    started twice) deleted the first's checkpoint writes in progress and interleaved its metrics.
    Refused in one line while another process holds it; the lock goes with the process, however
    it ends. `enabled=False`: no lock (the other ranks of a run, whose main process holds it)."""
    if not enabled:
        yield
        return
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{what} '{folder}' is in use by another run (it holds {folder / '.lock'}): "
                "wait for it to end, or give another folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


@contextmanager
def replacing_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; on success it is swapped in for `path` (the old one
    renamed aside, the new one renamed in, the old one removed), on an error it is removed. A crash
    leaves the old folder or the new one, whole: one between the two renames is repaired by the
    next call, which puts the old folder back first."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        old.rename(path)
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        plain_permissions(tmp)  # mkdtemp-like 0700 folders, safetensors' 0600 files
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_text_replacing(path: str | Path, text: str) -> None:
    """`path.write_text(text)`, whole or not at all (`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
