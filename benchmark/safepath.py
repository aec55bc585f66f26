"""Paths built from text that came out of a file: validated identifiers only, inside their folder.

Every file name advbench derives from a row, a config or a stamp (a report table's
``<dataset>_<profile>``, a RobustBench export's dataset folder, a stale-rows folder named
after a digest) goes through :func:`identifier` / :func:`hex_digest` and :func:`inside`:

* an identifier is 1-:data:`MAX_IDENT` characters of ``[A-Za-z0-9._+-]``, starting with a
  letter or digit: no separator, no ``..``, no control character, nothing absolute;
* the joined path must resolve (symlinks of its folders followed) inside the folder it belongs
  to, so a symlinked ``eval/`` pointing elsewhere is refused too;
* files are written without following a symlink at their own name (:func:`write_bytes`: a
  temp file opened with ``O_EXCL | O_NOFOLLOW``, then ``os.replace``, which replaces a symlink
  instead of writing through it), and read back with ``O_NOFOLLOW`` (:func:`read_small`).

Text that fails is a bad file: :class:`benchmark.errors.DataError` (exit 2), raised before
anything is written.
"""
from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from typing import Optional

from benchmark.errors import DataError

#: longest identifier a path may be built from
MAX_IDENT = 64
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


#: longest file or folder name :func:`inside` accepts (a table stem holds two identifiers)
MAX_NAME = 255


def ident_problem(value: object, max_len: int = MAX_IDENT) -> Optional[str]:
    """Why ``value`` cannot be a path component (None if it can)."""
    if not isinstance(value, str):
        return f"{type(value).__name__}, not a string"
    if len(value) > max_len:
        return f"{len(value)} characters (at most {max_len})"
    if not _IDENT.fullmatch(value) or ".." in value:
        return (f"{value!r} is not a name (letters, digits and . _ + - only, starting with a "
                f"letter or digit, no '..')")
    return None


def identifier(value: object, what: str, where: object = "", max_len: int = MAX_IDENT) -> str:
    """``value`` if it is a safe path component.

    Raises:
        DataError: it is not (names ``what`` and the file ``where`` it came from).
    """
    problem = ident_problem(value, max_len)
    if problem is not None:
        raise DataError(f"{where}: {what} {problem}" if where else f"{what} {problem}")
    return str(value)


def is_hex_digest(text: object) -> bool:
    """Whether ``text`` is a lowercase SHA-256 hex digest (64 hex digits)."""
    return isinstance(text, str) and _HEX64.fullmatch(text) is not None


def inside(root: Path | str, *parts: str) -> Path:
    """``root/parts...`` after checking every part and that its folder resolves inside ``root``.

    Raises:
        DataError: a part is not an identifier, or the path leaves ``root`` (a symlinked
            folder pointing elsewhere).
    """
    root = Path(root)
    for p in parts:  # a hidden file's name (".checkpoint-best.sha256") is one dot + a name
        identifier(p[1:] if p.startswith(".") else p, "path component", root, MAX_NAME)
    path = root.joinpath(*parts)
    # the folders on the way are resolved (a symlinked folder pointing elsewhere is refused);
    # the last name is not: a writer replaces a symlink there instead of following it
    if parts and not path.parent.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{path.parent} resolves outside {root} (a symlink?): refused")
    return path


def read_small(path: Path, limit: int = 4096) -> Optional[str]:
    """The text of a small file, or None if it is missing, a symlink, not a regular file,
    larger than ``limit`` bytes or not UTF-8. Never follows a symlink at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:  # missing, or a symlink (ELOOP)
        return None
    try:
        st = os.fstat(fd)
        import stat
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def write_bytes(root: Path | str, parts: tuple[str, ...], data: bytes) -> Path:
    """Write ``data`` to ``root/parts...`` (checked by :func:`inside`) atomically, replacing a
    symlink at that name instead of following it. Returns the path."""
    path = inside(root, *parts)
    atomic_write_bytes(path, data)
    return path


#: this machine's name in temp-file names (``store`` tells its own stale temp files by it)
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def tmp_name(path: Path) -> Path:
    """``.<name>.<host>-<pid>.<random>.tmp`` beside ``path`` (its owner can be told later)."""
    return path.parent / f".{path.name}.{HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + ``os.replace`` (never a half-written file).

    A symlink at ``path`` is replaced by the file, never written through.

    The file gets the process umask's permissions (0644 under umask 022), like any other file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
