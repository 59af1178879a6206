"""Publishing adapter versions: never overwrite, rename into place atomically.

A round writes into ``adapters/.tmp-<name>-<pid>``; once the weights and the
manifest are on disk (fsynced) the folder is renamed to ``adapters/vNNNN`` in one
step, and only then registered. A reader therefore sees a complete version or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def data_hash(*row_lists: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for rows in row_lists:
        for r in rows:
            h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
        h.update(b"\x1e")
    return h.hexdigest()


def temp_dir(adapters_dir: Path, name: str) -> Path:
    adapters_dir.mkdir(parents=True, exist_ok=True)
    path = adapters_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, adapters_dir: Path, version: str, manifest: dict[str, Any]) -> Path:
    """Write the manifest into ``tmp`` and rename it to ``adapters_dir/version``.

    Raises FileExistsError if that version folder already exists (never overwrites).
    """
    (tmp / MANIFEST).write_text(json.dumps({"version": version, **manifest}, indent=2,
                                           default=str))
    _fsync_tree(tmp)
    final = adapters_dir / version
    if final.exists():
        raise FileExistsError(f"adapter folder {final} already exists")
    os.rename(tmp, final)
    dfd = os.open(adapters_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())
