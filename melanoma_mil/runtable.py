"""The per-slide table `tile` and `extract` end with: printed, and written as a CSV.

A cohort run is judged slide by slide (which slides failed and why, which had no tiles, where the
resolution came from, which reader served them), so both commands print the same kind of table
and write it beside their outputs. Long cohorts print the slides that need a look and a count of
the rest; the CSV always has every slide.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from melanoma_mil.io import write_text

log = logging.getLogger(__name__)

PRINT_ALL_UP_TO = 40  # slides; beyond, only the rows that are not ok are printed
GOOD = ("ok", "skipped")


def _cell(value: object, width: int) -> str:
    text = "" if value is None or (isinstance(value, float) and value != value) else str(value)
    if isinstance(value, float) and text:
        text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(df: pd.DataFrame, columns: list[str], widths: dict[str, int]) -> str:
    """Fixed-width text of ``columns`` (the last column, the reason, is not truncated)."""
    shown = df if len(df) <= PRINT_ALL_UP_TO else df[~df["status"].isin(GOOD)]
    lines = ["  ".join(f"{c:<{widths.get(c, 12)}}" for c in columns).rstrip()]
    for row in shown.itertuples(index=False):
        cells = [
            _cell(getattr(row, c), widths.get(c, 12) if c != columns[-1] else 10**6)
            for c in columns
        ]
        lines.append(
            "  ".join(
                f"{v:<{widths.get(c, 12)}}" for c, v in zip(columns, cells, strict=True)
            ).rstrip()
        )
    if len(shown) < len(df):
        lines.append(f"({len(df) - len(shown)} slides ok or skipped not shown: see the CSV)")
    return "\n".join(lines)


def counts(df: pd.DataFrame, statuses: tuple[str, ...]) -> str:
    """``3 ok, 1 empty, 0 failed, ...``: every status named, then any other that occurs."""
    c = Counter(df["status"])
    names = [*statuses, *sorted(set(c) - set(statuses))]
    return ", ".join(f"{c[s]} {s}" for s in names)


def show(
    df: pd.DataFrame,
    title: str,
    columns: list[str],
    widths: dict[str, int],
    statuses: tuple[str, ...],
) -> None:
    print(f"{title}: {counts(df, statuses)}\n{format_table(df, columns, widths)}", flush=True)


def write(df: pd.DataFrame, csv: Path) -> bool:
    """Write the table; False (and a one-line error) if it cannot be written, e.g. on a full
    disk, so the run still ends with its printed table and an exit code."""
    try:
        write_text(csv, df.to_csv(index=False))
    except OSError as e:
        log.error("could not write the run table %s: %s", csv, e)
        return False
    print(f"  table: {csv}", flush=True)
    return True
