"""The slides a user names: slide files, folders of slides and CSV tables of slides.

Compression, the slide audit, feature-bag import and the unsupervised encoder methods all
take their slides this way; :func:`list_slides` is the one reading of such a list.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from nic.errors import DataError
from nic.slide._slide import SLIDE_SUFFIXES, is_slide_file

__all__ = ["list_slides"]


def list_slides(
    items: Sequence[str | Path], *, strict: bool = False, mpp_column: bool = False
) -> list[tuple[Path, float | None]]:
    """(slide path, level-0 um/px or None) for each slide that ``items`` name, in order.

    An item is a folder (its slide files, :func:`is_slide_file`, sorted by name), a CSV
    file (``.csv``) or a slide file.  A CSV needs a ``slide`` or ``path`` column (any
    case); empty cells are skipped, ``~`` is expanded and relative paths are taken from
    the CSV's folder.  With ``mpp_column``, a CSV's ``mpp`` column (any case; empty: None)
    gives that slide's level-0 um/px; otherwise the um/px is always None.

    ``strict``: a folder without slide files, or an item that is no file or folder, is a
    :class:`DataError` (for jobs that need every slide named before they start).  Not
    strict: an empty folder adds nothing and a missing item is listed as it is (a
    compression run then reports that slide as failed and goes on with the others).
    Nothing is deduplicated.
    """
    out: list[tuple[Path, float | None]] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if is_slide_file(f))
            if strict and not files:
                raise DataError(f"{p}: no slide files inside (looked for {', '.join(SLIDE_SUFFIXES)})")
            out += [(f, None) for f in files]
        elif p.suffix.lower() == ".csv" and p.is_file():
            out += _from_csv(p, mpp_column)
        elif strict and not p.is_file():
            raise DataError(f"{p}: no such slide, folder or CSV")
        else:
            out.append((p, None))
    return out


def _from_csv(path: Path, mpp_column: bool) -> list[tuple[Path, float | None]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel starts its UTF-8 CSVs with a BOM
        reader = csv.DictReader(fh)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        col = cols.get("slide") or cols.get("path")
        if col is None:
            raise DataError(
                f"{path}: no 'slide' or 'path' column (columns: {reader.fieldnames}); add one with the slide files"
            )
        mpp_col = cols.get("mpp") if mpp_column else None
        out: list[tuple[Path, float | None]] = []
        for row in reader:
            name = (row.get(col) or "").strip()
            if not name:
                continue
            mpp = (row.get(mpp_col) or "").strip() if mpp_col else ""
            p = Path(name).expanduser()
            out.append((p if p.is_absolute() else path.parent / p, _mpp(path, reader.line_num, mpp) if mpp else None))
    return out


def _mpp(path: Path, line: int, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DataError(
            f"{path}, line {line}: mpp {text!r} is not a positive number; give the slide's level-0 um/px or "
            "leave the cell empty"
        )
    return value
