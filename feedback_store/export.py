"""Write dataset rows as JSONL files that `datasets.load_dataset("json", ...)` reads."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .datasets import RowFilter, build_dpo_rows, build_kto_rows
from .errors import InvalidInput
from .store import FeedbackStore

KINDS = ("kto", "dpo")


def rows_for(store: FeedbackStore, kind: str, flt: RowFilter | None = None) -> list[dict[str, Any]]:
    if kind == "kto":
        return build_kto_rows(store, flt)
    if kind == "dpo":
        return build_dpo_rows(store, flt)
    raise InvalidInput(f"kind must be 'kto' or 'dpo', not {kind!r}")


def to_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path | str) -> int:
    """Write rows atomically (temporary file, then rename); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def export(store: FeedbackStore, *, kind: str, out: Path | str, flt: RowFilter | None = None) -> int:
    return write_jsonl(rows_for(store, kind, flt), out)
