"""Rules for a slide's pixel size (um/px at level 0).

Order: a value given by the user; the vendor's own metadata; TIFF resolution tags only
when their unit is the centimetre and the value is plausible.  The 72 and 96 dpi defaults
that image libraries write mean "unknown", and unknown is an error, never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from nic.errors import MppError

#: um/px outside this range cannot come from a microscope scan at any usual magnification.
PLAUSIBLE_MPP = (0.05, 100.0)
#: Pixels per inch that image software writes by default; they say nothing about the scan.
DEFAULT_DPI = (72.0, 96.0, 150.0, 300.0)


def plausible(mpp: float | None) -> bool:
    return mpp is not None and math.isfinite(mpp) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def check_user_mpp(value: float | tuple[float, float], path: Path | None = None) -> tuple[float, float]:
    """(x, y) um/px of a level-0 pixel size given by the user (one number or two).

    Raises :class:`MppError` (naming ``path`` when given) for a value that is not a
    positive number or lies outside :data:`PLAUSIBLE_MPP`: such a value would make a
    region read absurdly large or small, and no microscope scan has it.
    """
    where = f"{path}: " if path is not None else ""
    mx, my = (value, value) if isinstance(value, int | float) else value
    for m in (mx, my):
        if not (isinstance(m, int | float) and m > 0 and math.isfinite(m)):
            raise MppError(f"{where}`mpp` must be a positive number of um per pixel, got {m!r}")
        if not plausible(m):
            lo, hi = PLAUSIBLE_MPP
            raise MppError(
                f"{where}`mpp` {m:g} is outside {lo:g}-{hi:g} um/px, the level-0 pixel sizes of slide scans "
                "(40x is about 0.25, 20x 0.5, 5x 2); give the um/px of the slide's level 0"
            )
    return float(mx), float(my)


def mpp_from_resolution(value: float | None, unit: str | int | None) -> tuple[float | None, str]:
    """um/px from a TIFF X/YResolution value and its ResolutionUnit, or None with a reason.

    ``unit`` is the TIFF code (1 none, 2 inch, 3 centimetre) or its name.
    """
    if value is None or not value or value <= 0:
        return None, "no resolution tags"
    name = str(unit).strip().lower()
    if name in {"3", "centimeter", "centimetre", "cm"}:
        mpp = 1e4 / float(value)
        if any(abs(mpp - 2.54e4 / dpi) < 1e-3 * mpp for dpi in DEFAULT_DPI):
            return None, f"the TIFF resolution tags hold a {round(2.54e4 / mpp)} dpi default, not the scan's"
        if not plausible(mpp):
            return None, f"resolution tags give an implausible {mpp:.4g} um/px"
        return mpp, "TIFF resolution tags (centimetre)"
    if name in {"2", "inch"}:
        return (
            None,
            f"the TIFF resolution tags say {float(value):g} dpi in inches, an image-software default, not the scan's",
        )
    return None, "resolution tags have no unit"


def resolve_mpp(
    path: Path,
    user_mpp: float | tuple[float, float] | None,
    vendor: str,
    properties: Mapping[str, str],
    tiff_resolution: tuple[float | None, float | None, str | int | None] | None = None,
) -> tuple[tuple[float, float], str]:
    """Return ((mpp_x, mpp_y), source) or raise :class:`MppError` naming the file and the fix.

    ``tiff_resolution`` is (XResolution, YResolution, ResolutionUnit) of the first page,
    used only for generic TIFF files and plain images, whose "vendor metadata" is
    nothing but those tags.
    """
    if user_mpp is not None:
        return check_user_mpp(user_mpp, path), "given by the user"

    reason = "no pixel size in the file"
    if vendor not in {"generic-tiff", "image", "tiff"}:
        mx = _float(properties.get("openslide.mpp-x"))
        my = _float(properties.get("openslide.mpp-y")) or mx
        if plausible(mx) and plausible(my):
            return (mx, my), f"{vendor} metadata"  # type: ignore[return-value]
        if mx is not None:
            reason = f"{vendor} metadata gives an implausible {mx:.4g} um/px"
    elif tiff_resolution is not None:
        xres, yres, unit = tiff_resolution
        mx, reason = mpp_from_resolution(xres, unit)
        my, _ = mpp_from_resolution(yres or xres, unit)
        if mx is not None:
            return (mx, my or mx), reason
    raise MppError(
        f"{path}: pixel size unknown ({reason}); pass `mpp` with the um/px of level 0, "
        "for example `mpp=0.25` for a 40x scan or 0.5 for 20x"
    )


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None
