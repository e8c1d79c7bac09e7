"""Atomic writes: every file simmoe writes appears whole or not at all.

- :func:`atomic_path` yields a *partial* beside the target (``.NAME.<pid>.<rand>.partial``),
  lets the caller write it, flushes it to disk and ``os.replace``-s it onto the target;
- :func:`atomic_files` stages several files in a partial folder and moves them in together,
  after checking every target (all files or none);
- a target that exists and is not a regular file (a device node, a FIFO, a folder, a socket)
  is refused before anything is written: ``-o /dev/full`` run as root never replaces the
  device with a regular file;
- partials left by a run that was killed (its pid is gone) are removed the next time the same
  target is written;
- any OSError while writing (a full disk, a read-only folder, a quota) becomes one
  :class:`~simulator.errors.InputError` naming the target and the flag, and no partial is left.
"""
from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputError

SUFFIX = ".partial"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.partial$")
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def cannot_write(target: str | Path, field: str, e: OSError) -> InputError:
    """The one-line error for an OSError while writing ``target``."""
    return InputError(str(target), field, f"cannot write: {e.strerror or e}")


def partial_path(target: Path) -> Path:
    """A fresh partial name beside ``target``: ``.NAME.<pid>.<8 hex>.partial``."""
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{SUFFIX}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def clean_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the partials of target ``folder/name`` (of any target in ``folder`` if ``name`` is
    None) whose writing process is gone; returns them."""
    removed = []
    for p in Path(folder).glob(f".{glob.escape(name) if name else ''}*{SUFFIX}"):
        m = _PARTIAL.match(p.name)
        if not m or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def check_target(target: str | Path, field: str) -> None:
    """Refuse a ``target`` that exists and is not a regular file (symlinks are followed)."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise cannot_write(target, field, e) from None
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
        raise InputError(str(target), field, f"exists and is {kind}, not a regular file: refusing to replace it "
                                             "(give a file path)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_target(target: Path, field: str) -> None:
    """Check ``target``, create its folder and remove its stale partials (before writing it)."""
    check_target(target, field)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(target, field, e) from None
    clean_stale(target.parent, target.name)


@contextmanager
def atomic_path(target: str | Path, field: str = "--out") -> Iterator[Path]:
    """Yield an empty partial file beside ``target`` to write; on success it replaces ``target``.

    An exception in the block removes the partial and leaves ``target`` as it was; an OSError
    (raised while writing or moving) becomes an InputError naming ``target`` and ``field``.
    """
    target = Path(target)
    prepare_target(target, field)
    tmp = partial_path(target)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        _fsync(tmp)
        check_target(target, field)       # again: it may have appeared while we wrote
        os.replace(tmp, target)
    except OSError as e:
        raise cannot_write(target, field, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_with(target: str | Path, write: Callable[[Path], object], field: str = "--out") -> Path:
    """``write(partial)`` then move it onto ``target`` (see :func:`atomic_path`); returns ``target``."""
    with atomic_path(target, field) as tmp:
        write(tmp)
    return Path(target)


def write_text(target: str | Path, text: str, field: str = "--out") -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return write_with(target, lambda p: p.write_text(text, encoding="utf-8"), field)


@contextmanager
def atomic_files(folder: str | Path, field: str = "--out") -> Iterator[Path]:
    """Yield an empty partial folder inside ``folder``; what the block writes there is moved
    into ``folder`` when it ends, after every target has been checked (all files or none)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(str(folder), field, "exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(folder, field, e) from None
    clean_stale(folder, "staging")
    stage = partial_path(folder / "staging")
    try:
        stage.mkdir()
        yield stage
        names = sorted(os.listdir(stage))
        for n in names:
            check_target(folder / n, field)
        for n in names:
            _fsync(stage / n)
        for n in names:
            os.replace(stage / n, folder / n)
    except OSError as e:
        raise cannot_write(folder, field, e) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
