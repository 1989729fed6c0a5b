"""A cohort audit before compression: can every slide be read, at which um/px, with what pyramid?

One :class:`AuditRow` per slide: readable or not (and why), vendor, level-0 size, levels
and downsamples, um/px and its source, objective power, the level nearest the encoder's
um/px, the tissue patches a ``nic compress`` grid would hold and the time it would take,
and a flag for every suspicious value.  Flags that make ``nic compress`` fail
(:attr:`AuditRow.would_fail`): unreadable, no um/px (including the 72/96-dpi defaults of
image software, which nic never takes for a scan's pixel size), a scan coarser than the
encoder's um/px allows, no tissue.  Flags that only warn: downsamples that are not powers
of two, no pyramid on a large slide, um/px that disagrees with the objective power,
anisotropic pixels, no level near the encoder's um/px.

The CSV has a ``slide`` column, so ``nic compress audit.csv`` reads it.
"""

from __future__ import annotations

import csv
import html
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nic.errors import MppError, SlideError

__all__ = ["AuditOptions", "AuditRow", "audit_slide", "audit_slides", "write_csv", "write_html"]

logger = logging.getLogger(__name__)

#: A level within this ratio of the encoder's um/px counts as "near" (read without resampling much).
NEAR = 1.10
#: um/px x objective power is ~10 (20x: 0.5 um/px); outside these bounds the two disagree.
POWER_RATIO = (0.75, 1.33)
#: A single-level slide larger than this (pixels, either side) has no pyramid worth the name.
NO_PYRAMID_PX = 10_000
#: Objective power keys, in order of trust.
POWER_KEYS = ("openslide.objective-power", "aperio.AppMag", "hamamatsu.SourceLens")


@dataclass(frozen=True)
class AuditOptions:
    """The encoder the audit checks against: input ``mpp`` (um/px) and ``patch`` (px), and
    its measured or assumed throughput ``patches_per_s`` for the time estimate;
    ``tissue``: estimate tissue patches (reads a thumbnail of every slide)."""

    mpp: float = 0.5
    patch: int = 128
    patches_per_s: float = 300.0
    tissue: bool = True


@dataclass
class AuditRow:
    """One slide's audit; sizes in level-0 pixels, um/px per level-0 pixel unless named."""

    slide: str
    readable: bool = False
    error: str = ""
    vendor: str = ""
    width: int | None = None
    height: int | None = None
    levels: int | None = None
    downsamples: str = ""
    mpp_x: float | None = None
    mpp_y: float | None = None
    mpp_source: str = ""
    objective_power: float | None = None
    encoder_mpp: float | None = None
    nearest_level: int | None = None
    nearest_level_mpp: float | None = None
    level_near_encoder: bool | None = None
    tissue_patches: int | None = None
    est_seconds: float | None = None
    flags: list[str] = field(default_factory=list)
    would_fail: bool = False

    def flag(self, text: str, fail: bool = False) -> None:
        self.flags.append(text)
        self.would_fail |= fail

    def to_row(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = "; ".join(self.flags)
        return d


def _power(props: dict[str, str]) -> float | None:
    for k in POWER_KEYS:
        try:
            v = float(props.get(k, ""))
        except ValueError:
            continue
        if v > 0:
            return v
    return None


def _default_dpi(path: Path) -> float | None:
    """The dpi of a TIFF's resolution tags when it is an image-software default (72, 96 ...)."""
    from nic.slide._mpp import DEFAULT_DPI

    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tag, unit = page.tags.get(282), page.tags.get(296)
            if tag is None:
                return None
            v = tag.value
            value = v[0] / v[1] if isinstance(v, tuple) and v[1] else float(v)  # type: ignore[arg-type]
            code = int(unit.value) if unit is not None else 2
    except Exception:  # not a TIFF, or tags tifffile cannot parse: nothing to say
        return None
    dpi = value if code == 2 else value * 2.54 if code == 3 else None
    if dpi is None:
        return None
    return next((d for d in DEFAULT_DPI if abs(dpi - d) < 0.01 * d), None)


def _open(path: Path) -> tuple[Any, str]:
    """(slide, "") or (slide opened with a placeholder um/px, why its own is unknown)."""
    from nic.slide import open_slide

    try:
        return open_slide(path), ""
    except MppError as e:
        return open_slide(path, mpp=1.0), str(e)


def audit_slide(path: str | Path, options: AuditOptions | None = None) -> AuditRow:
    """Audit one slide; never raises for a bad slide (the row says what is wrong)."""
    o = options or AuditOptions()
    p = Path(path)
    row = AuditRow(str(p.resolve() if p.exists() else p), encoder_mpp=o.mpp)
    try:
        _audit(row, p, o)
    except Exception as e:  # whatever one slide raises is that slide's fault, not the cohort's
        if not isinstance(e, SlideError):
            logger.debug("%s: audit failed", p, exc_info=True)
        row.error = str(e) if isinstance(e, SlideError) else f"{p}: {type(e).__name__}: {e}"
        row.flag("unreadable pixels" if row.readable else "unreadable", fail=True)
    return row


def _audit(row: AuditRow, p: Path, o: AuditOptions) -> None:
    slide, mpp_error = _open(p)
    with slide:
        row.readable = True
        row.vendor = slide.vendor
        row.width, row.height = slide.dimensions
        ds = [float(lv.downsample) for lv in slide.levels]
        row.levels = len(ds)
        row.downsamples = ";".join(f"{d:.4g}" for d in ds)
        row.objective_power = _power(slide.properties)
        _check_pyramid(row, ds)
        if mpp_error:
            row.error = mpp_error
            dpi = _default_dpi(p)
            if dpi is not None:
                row.flag(f"um/px missing: the file holds a {dpi:g}-dpi image-software default", fail=True)
            else:
                row.flag("um/px missing", fail=True)
            return
        mx, my = slide.mpp
        row.mpp_x, row.mpp_y, row.mpp_source = float(mx), float(my), slide.mpp_source
        if abs(mx / my - 1) > 0.01:
            row.flag(f"anisotropic pixels ({mx:.4g} x {my:.4g} um/px)")
        if row.objective_power:
            ratio = mx * row.objective_power / 10.0
            if not POWER_RATIO[0] <= ratio <= POWER_RATIO[1]:
                row.flag(
                    f"um/px {mx:.4g} disagrees with objective power {row.objective_power:g}x "
                    f"(expects about {10 / row.objective_power:.3g})"
                )
        _check_levels(row, slide, ds, o)
        if not row.would_fail and o.tissue:
            _estimate(row, slide, o)


def _check_pyramid(row: AuditRow, ds: list[float]) -> None:
    odd = [d for d in ds if abs(d / 2 ** round(math.log2(d)) - 1) > 0.02]
    if odd:
        row.flag(f"non-standard downsamples ({row.downsamples}): not powers of two")
    if len(ds) == 1 and max(row.width or 0, row.height or 0) > NO_PYRAMID_PX:
        row.flag(f"no pyramid (one level of {row.width} x {row.height} px): every read is at full resolution")


def _check_levels(row: AuditRow, slide: Any, ds: list[float], o: AuditOptions) -> None:
    from nic.compress._pipeline import MPP_TOLERANCE

    coarse = max(slide.mpp)  # a level is as fine as its coarser axis (Slide.best_level)
    level_mpp = [coarse * d for d in ds]
    best = min(range(len(ds)), key=lambda i: abs(math.log(level_mpp[i] / o.mpp)))
    row.nearest_level, row.nearest_level_mpp = best, round(level_mpp[best], 6)
    row.level_near_encoder = abs(math.log(level_mpp[best] / o.mpp)) <= math.log(NEAR)
    if coarse > o.mpp * MPP_TOLERANCE:
        row.flag(
            f"scanned at {coarse:.4g} um/px, coarser than the encoder's {o.mpp:g} um/px: nic compress refuses it",
            fail=True,
        )
    elif not row.level_near_encoder:
        use = slide.best_level(o.mpp)
        row.flag(f"no level near {o.mpp:g} um/px: reads level {use} ({level_mpp[use]:.4g} um/px) and resamples")


def _estimate(row: AuditRow, slide: Any, o: AuditOptions) -> None:
    from nic.grid import patch_grid

    grid = patch_grid(slide, mpp=o.mpp, patch=o.patch)  # a failure is audit_slide's "unreadable pixels"
    row.tissue_patches = grid.n_tissue
    row.est_seconds = grid.n_tissue / o.patches_per_s
    if grid.n_tissue == 0:
        row.flag("no tissue found", fail=True)


def audit_slides(slides: Sequence[str | Path], options: AuditOptions | None = None) -> list[AuditRow]:
    """Audit slide files, folders or CSVs (as ``nic compress`` takes them), one row each."""
    from nic.compress import collect_slides

    return [audit_slide(f, options) for f in collect_slides(slides)]


def _columns() -> list[str]:
    return [f.name for f in fields(AuditRow)]


def write_csv(rows: Sequence[AuditRow], path: str | Path) -> Path:
    """The audit as CSV (``slide`` first, so ``nic compress`` reads it); flags joined by '; '."""
    from nic._outputs import write_atomic

    p = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, _columns())
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None else v) for k, v in r.to_row().items()})

    write_atomic(p, write)
    return p


def write_html(rows: Sequence[AuditRow], path: str | Path) -> Path:
    """The audit as one HTML table; rows that would fail in red, flagged rows in amber."""
    from nic._outputs import write_atomic

    cols = _columns()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        colour = "#f8d7da" if r.would_fail else "#fff3cd" if r.flags else "#ffffff"
        cells = "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r.to_row().values())
        body.append(f'<tr style="background:{colour}">{cells}</tr>')
    n_fail = sum(r.would_fail for r in rows)
    text = (
        "<!doctype html><html><head><meta charset='utf-8'><title>nic audit</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 6px;font-size:13px}</style></head><body>"
        f"<h1>nic audit</h1><p>{len(rows)} slides, {n_fail} would fail, "
        f"{sum(bool(r.flags) for r in rows)} flagged.</p>"
        f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>\n"
    )
    p = Path(path)
    write_atomic(p, lambda tmp: Path(tmp).write_text(text))
    return p
