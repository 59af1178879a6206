"""Tables behind the console's plots (pandas DataFrames for ``gr.LinePlot``/``gr.BarPlot``).

* feedback volume: events per UTC day or hour and kind (``feedback_store.reports``);
* thumbs-up rate per adapter version: ``up / (up + down)`` over each voter's latest
  vote per reply, with the number of ratings behind each bar;
* a training run's curves: loss and reward margin per logged step and phase, from the
  run's ``history`` records ``{"phase", "step", "loss", "reward_margin", ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd

from feedback_store.reports import VersionThumbs, VolumePoint, feedback_volume, thumbs_by_version

from .context import ConsoleContext, ConsoleError

VOLUME_COLUMNS = ["bucket", "kind", "events"]
THUMBS_COLUMNS = ["version", "label", "up_rate", "ratings", "up", "down"]
CURVE_COLUMNS = ["step", "phase", "loss", "reward_margin"]


def volume_frame(points: Iterable[VolumePoint], bucket: str) -> pd.DataFrame:
    fmt = "%Y-%m-%d" if bucket == "day" else "%Y-%m-%d %H:00"
    rows = [[p.bucket_start.strftime(fmt), p.kind, p.count] for p in points]
    return pd.DataFrame(rows, columns=VOLUME_COLUMNS).astype({"events": "int64"})


def thumbs_frame(thumbs: Iterable[VersionThumbs]) -> pd.DataFrame:
    rows = []
    for t in thumbs:
        name = t.adapter_version or "(none)"
        rate = round(t.up_rate, 4) if t.up_rate is not None else None
        rows.append([name, f"{name} (n={t.ratings})", rate, t.ratings, t.up, t.down])
    return pd.DataFrame(rows, columns=THUMBS_COLUMNS).astype(
        {"up_rate": "float64", "ratings": "int64", "up": "int64", "down": "int64"})


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def curves_frame(history: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per logged step; a missing or non-finite loss/margin is left empty."""
    rows = []
    for rec in history:
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        rows.append([step, str(rec.get("phase", "?")), _finite(rec.get("loss")),
                     _finite(rec.get("reward_margin"))])
    frame = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    # Numeric columns (None -> NaN) so the plot draws quantitative axes, not categories.
    return frame.astype({"step": "int64", "loss": "float64", "reward_margin": "float64"})


def overview(ctx: ConsoleContext, *, bucket: str = "day", days: Any = 30,
             now: datetime | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(volume over the last ``days`` days, thumbs per version over all time)."""
    try:
        span = float(days)
        if not math.isfinite(span) or span <= 0 or span > 3660:
            raise ValueError
    except (TypeError, ValueError):
        raise ConsoleError(f"the period must be a number of days from 1 to 3660, not {days!r}"
                           ) from None
    if bucket not in ("day", "hour"):
        raise ConsoleError(f"bucket must be day or hour, not {bucket!r}")
    now = now or datetime.now(UTC)
    points = feedback_volume(ctx.store, bucket=bucket, since=now - timedelta(days=span))
    return volume_frame(points, bucket), thumbs_frame(thumbs_by_version(ctx.store))
