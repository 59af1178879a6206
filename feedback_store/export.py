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
    if kind == "kto":  # with the reasons users picked (a column TRL leaves alone)
        return build_kto_rows(store, flt, with_tags=True)
    if kind == "dpo":
        return build_dpo_rows(store, flt)
    raise InvalidInput(f"kind must be 'kto' or 'dpo', not {kind!r}")


# Line breaks that JSON leaves raw inside strings but str.splitlines() (and other
# Unicode-aware line readers) split on; escaping them keeps one row per line for all.
_UNICODE_BREAKS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def jsonl_line(row: dict[str, Any]) -> str:
    """One row as a UTF-8 JSON line (ending in a newline, with no other line break)."""
    line = json.dumps(row, ensure_ascii=False)
    for raw, escaped in _UNICODE_BREAKS.items():
        line = line.replace(raw, escaped)
    return line + "\n"


def to_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(jsonl_line(r) for r in rows)


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path | str) -> int:
    """Write rows atomically (temporary file, then rename); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(jsonl_line(r))
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
