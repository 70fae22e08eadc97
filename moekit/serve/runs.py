"""Read-only JSON views of a training run or a ``moekit compare`` directory, for the dashboard page.

``GET /v1/moekit/runs`` lists the runs under the root (the root itself when it is a run; else every
directory below it, up to two levels deep, that holds a ``metrics.jsonl`` or a ``config.json``), with the
model and seed a compare directory's ``<model>-s<seed>`` names carry. ``GET /v1/moekit/runs/{name}/metrics
?offset=N`` returns the records appended to that run's ``metrics.jsonl`` since byte ``offset`` and the
offset to ask from next, so a page can poll a run that is still training and read only what is new.

Nothing here writes. A run name is looked up among the listed runs, never joined onto the root, so no
path leaves the directory (``..``, absolute paths and symlinks out of it are refused with a 404).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query

from moekit.serve.protocol import APIError, error_responses

#: Most bytes of metrics.jsonl one request reads (a page asks again from the returned offset for the rest).
MAX_READ_BYTES = 4 << 20
_NAME = re.compile(r"^(?P<model>.+)-s(?P<seed>\d+)$")  # moekit compare's <model>-s<seed>


def is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "config.json").is_file()


def find_runs(root: Path) -> dict[str, Path]:
    """Run name (its path below ``root``; the directory's own name when ``root`` is itself a run, since a
    "." would vanish from a URL) -> its directory, sorted by name.
    Directories that resolve outside ``root`` (a symlink out) are left out."""
    root = root.resolve()
    if is_run(root):
        return {root.name or "run": root}
    found: dict[str, Path] = {}
    for depth in ("*", "*/*"):
        for d in sorted(root.glob(depth)):
            real = d.resolve()
            if d.is_dir() and is_run(real) and real.is_relative_to(root) and not any(
                    Path(name) in d.relative_to(root).parents for name in found):
                found[d.relative_to(root).as_posix()] = real
    return dict(sorted(found.items()))


def describe(name: str) -> dict[str, Any]:
    """A run's name with the model and seed a compare directory's name carries (None when it carries none)."""
    m = _NAME.match(Path(name).name)
    return {"name": name, "model": m["model"] if m else Path(name).name,
            "seed": int(m["seed"]) if m else None}


def read_since(path: Path, offset: int, limit: int = MAX_READ_BYTES) -> dict[str, Any]:
    """The records of ``path`` (JSON lines) from byte ``offset`` on, whole lines only (a line still being
    written waits for the next call; a torn line is skipped). ``reset`` is True when the file is now
    shorter than ``offset`` (a resumed run rewrote it): the records then start from byte 0."""
    if not path.is_file():  # a run that has not logged yet
        return {"records": [], "offset": 0, "reset": offset > 0, "size": 0}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        reset = offset > size
        start = 0 if reset else offset
        f.seek(start)
        chunk = f.read(min(limit, size - start))
    end = chunk.rfind(b"\n") + 1  # only complete lines
    records = []
    for line in chunk[:end].splitlines():
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):  # a line torn by a kill mid-write
            continue
    return {"records": records, "offset": start + end, "reset": reset, "size": size}


def runs_router(root: str | os.PathLike) -> APIRouter:
    """The two read-only endpoints for the runs under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: give a run directory or a `moekit compare` output")
    router = APIRouter()

    @router.get("/v1/moekit/runs", responses=error_responses(401))
    async def list_runs():
        """The runs under the served directory."""
        return {"object": "list", "root": root.resolve().name, "data": [describe(n) for n in find_runs(root)]}

    @router.get("/v1/moekit/runs/{name:path}/metrics", responses=error_responses(400, 401, 404))
    async def metrics(name: str, offset: int = Query(0, ge=0)):
        """Records of the run's metrics.jsonl from byte ``offset`` on, and the offset to poll from next."""
        runs = find_runs(root)
        if name not in runs:
            raise APIError(404, f"run {name!r} is not one of the runs here: {sorted(runs)}", "not_found_error",
                           param="name", code="run_not_found")
        return {"object": "moekit.metrics", **describe(name), **read_since(runs[name] / "metrics.jsonl", offset)}

    return router
