"""Small shared helpers: atomic file writes (write to a temporary name, fsync, rename), JSON objects, sizes."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moekit.errors import CheckpointError


def data_cache_dir() -> Path:
    """Where tokenized corpora are cached (memmaps named by source and tokenizer; safe to delete):
    ``$MOEKIT_CACHE``, else ``$XDG_CACHE_HOME/moekit``, else ``~/.cache/moekit``."""
    root = os.environ.get("MOEKIT_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "moekit"


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_permissions(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by ``mkstemp`` / a folder made by ``mkdtemp`` (both private: 0600 / 0700) the
    permissions a plain ``open()`` / ``mkdir()`` would have given it under the current umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename into place.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        plain_permissions(tmp)  # mkstemp makes it private; a checkpoint or report should not be
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename: fsync the directory entry (no-op where the OS does not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a CheckpointError naming the file if it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a file, or of every file under a directory."""
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def tune_cpu_allocator() -> bool:
    """Keep freed large CPU buffers in the heap instead of handing them back to the OS.

    glibc serves every allocation above a threshold with a fresh ``mmap`` and returns it with
    ``munmap`` on free, so a training step that allocates the same gradient and activation buffers
    each time pays a page fault per 4 KiB page, every step. Stacked expert weights make those buffers
    large (an [E, 2F, D] gradient is tens of MB), and on a 2-core CPU the kernel time was measured at
    over half of an MoE layer's step (benchmarks/moe_layer.py). This is the equivalent of setting
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``; the cost is that the process keeps its peak
    memory instead of shrinking. Called by the CLI's compute-heavy verbs; a no-op (False) off glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    ok = mallopt(M_MMAP_MAX, 0) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1  # int argument: 1 GiB
    ok &= mallopt(M_TOP_PAD, 64 << 20) == 1
    return bool(ok)


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``), e.g. after a load that
    built large temporaries: the process then holds what it uses, not its peak. False off glibc."""
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False


@functools.cache
def _libc():
    """The C library, found once (``find_library`` runs ldconfig in a subprocess: ~2 ms a call, and the
    GGUF loader trims after every weight)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def proc_status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``, ``RssAnon``), bytes; 0 where there
    is none (not Linux, or an older kernel)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
