"""Procedural H&E-like tissue textures at 0.5 um/px.

Every texture is drawn as two stain densities, haematoxylin ``H`` (nuclei, blue-purple)
and eosin ``E`` (cytoplasm, collagen, pink), float32 arrays of shape (size, size) in
optical-density units.  A :class:`Stain` turns them into RGB by Beer-Lambert absorption,
which is where per-slide colour variation comes in: the same drawn densities give many
plausible stainings.

At 0.5 um/px a 256-px tile is 128 um and a 128-px patch 64 um.  Sizes below are in
pixels at that resolution (about twice the size in um).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "CLASSES",
    "TISSUE_CLASSES",
    "CLASS_ID",
    "Stain",
    "Drawing",
    "draw_tile",
    "random_stain",
]

#: Class names by id.  Id 0 is the glass background; the others are tissue classes.
CLASSES: tuple[str, ...] = (
    "background",
    "tumour",
    "stroma",
    "normal",
    "lymphocytes",
    "fat",
    "necrosis",
)
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
TISSUE_CLASSES: tuple[str, ...] = CLASSES[1:]

# Stain optical-density vectors (R, G, B) per unit density, log10 units.
_H_VEC = np.array([0.65, 0.70, 0.29], np.float32)
_E_VEC = np.array([0.20, 0.80, 0.45], np.float32)


@dataclass(frozen=True)
class Stain:
    """A staining: stain vectors (unit-less OD per density), their strengths, the light.

    ``i0`` is the brightness of bare glass (grey levels); the background of a slide is
    close to it (about 240-250).
    """

    h_vec: tuple[float, float, float] = tuple(_H_VEC.tolist())  # type: ignore[assignment]
    e_vec: tuple[float, float, float] = tuple(_E_VEC.tolist())  # type: ignore[assignment]
    h_scale: float = 1.0
    e_scale: float = 1.0
    i0: float = 246.0

    def to_rgb(self, h: np.ndarray, e: np.ndarray) -> np.ndarray:
        """RGB uint8 (..., 3) from densities ``h`` and ``e`` of the same shape."""
        hv = np.asarray(self.h_vec, np.float32) * self.h_scale
        ev = np.asarray(self.e_vec, np.float32) * self.e_scale
        od = h[..., None].astype(np.float32) * hv + e[..., None].astype(np.float32) * ev
        rgb = self.i0 * np.exp(-math.log(10.0) * od)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def random_stain(rng: np.random.Generator, jitter: float = 1.0) -> Stain:
    """A randomly perturbed H&E staining; ``jitter`` 0 gives the reference staining."""

    def vec(base: np.ndarray) -> tuple[float, float, float]:
        v = np.clip(base + rng.normal(0.0, 0.04 * jitter, 3), 0.02, None)
        v = v / np.linalg.norm(v) * np.linalg.norm(base)
        return tuple(float(x) for x in v)  # type: ignore[return-value]

    return Stain(
        h_vec=vec(_H_VEC),
        e_vec=vec(_E_VEC),
        h_scale=float(1.0 + jitter * rng.uniform(-0.18, 0.18)),
        e_scale=float(1.0 + jitter * rng.uniform(-0.22, 0.22)),
        i0=float(246.0 + jitter * rng.uniform(-4.0, 4.0)),
    )


@dataclass
class Drawing:
    """One drawn texture: stain densities (size, size) float32 and what was drawn."""

    h: np.ndarray
    e: np.ndarray
    nuclei: int  # nuclei whose centre lies inside the image (mitoses included)
    mitoses: int  # mitosis-like figures drawn


# -- noise ---------------------------------------------------------------------------------


def _noise(
    rng: np.random.Generator, size: int, sigma: float, along: float | None = None, angle: float = 0.0
) -> np.ndarray:
    """Smooth periodic noise (size, size) with unit standard deviation.

    ``sigma`` is the correlation length in pixels; with ``along`` the noise is stretched
    to that length in the direction ``angle`` (radians, x towards y), like fibres.
    """
    from scipy import fft

    white = rng.standard_normal((size, size), dtype=np.float32)
    fy = fft.fftfreq(size).astype(np.float32)[:, None]
    fx = fft.rfftfreq(size).astype(np.float32)[None, :]
    if along is None:
        env = np.exp(-2.0 * (math.pi * sigma) ** 2 * (fx * fx + fy * fy))
    else:
        fu = fx * math.cos(angle) + fy * math.sin(angle)
        fv = -fx * math.sin(angle) + fy * math.cos(angle)
        env = np.exp(-2.0 * math.pi**2 * ((along * fu) ** 2 + (sigma * fv) ** 2))
    out = fft.irfft2(fft.rfft2(white) * env, s=(size, size)).astype(np.float32)
    sd = float(out.std())
    return out / sd if sd > 0 else out


def _jittered_grid(
    rng: np.random.Generator, size: int, spacing: float, jitter: float, margin: float = 0.0
) -> np.ndarray:
    """Points (n, 2) as (x, y) on a jittered square grid covering [-margin, size+margin)."""
    start = -margin + rng.uniform(0, spacing)
    ticks = np.arange(start, size + margin, spacing, dtype=np.float32)
    xx, yy = np.meshgrid(ticks, ticks)
    pts = np.stack([xx.ravel(), yy.ravel()], 1)
    pts += rng.normal(0.0, jitter * spacing, pts.shape).astype(np.float32)
    return pts


def _inside(pts: np.ndarray, size: int) -> int:
    return int(np.count_nonzero((pts >= 0).all(1) & (pts < size).all(1)))


# -- stamping ------------------------------------------------------------------------------


def _stamp(
    field: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    theta: float,
    value: float,
    rng: np.random.Generator | None = None,
    irregular: float = 0.0,
    edge: float = 1.2,
    texture: np.ndarray | None = None,
    mode: str = "add",
) -> tuple[slice, slice, np.ndarray] | None:
    """Draw a soft, optionally irregular ellipse into ``field`` (in place).

    ``a`` and ``b`` are the semi-axes (px), ``theta`` the angle of ``a`` (radians).
    ``mode`` "add" adds ``value * mask``; "max" raises the field to ``value`` inside.
    Returns the slices and the mask, or None when the ellipse misses the field.
    """
    size_y, size_x = field.shape
    r = int(math.ceil(max(a, b) * (1.0 + 2 * irregular) + edge + 1))
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 2, size_x)
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 2, size_y)
    if x1 <= x0 or y1 <= y0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(theta), math.sin(theta)
    u, v = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
    rho = np.sqrt(u * u + v * v)
    bound: np.ndarray | float = 1.0
    if irregular >= 0.06 and rng is not None:
        phi = np.arctan2(v, u)
        bound = 1.0 + sum(
            irregular * rng.uniform(0.3, 1.0) * np.cos(k * phi + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5)
        )
    mask = np.clip((bound - rho) * max(a, b) / edge + 0.5, 0.0, 1.0).astype(np.float32)
    sl = (slice(y0, y1), slice(x0, x1))
    if texture is not None:
        amount = value * mask * texture[sl]
    else:
        amount = value * mask
    if mode == "max":
        np.maximum(field[sl], amount, out=field[sl])
    else:
        field[sl] += amount
    return sl[0], sl[1], mask


def _chromatin(rng: np.random.Generator, size: int, coarse: float = 1.0) -> np.ndarray:
    """Multiplicative chromatin texture (size, size) around 1."""
    return np.clip(1.0 + 0.28 * _noise(rng, size, 1.0 * coarse), 0.45, 1.6)


def _nucleus(
    h: np.ndarray,
    e: np.ndarray,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    a: float,
    b: float,
    theta: float,
    value: float,
    irregular: float,
    texture: np.ndarray,
    clear: float = 0.55,
) -> None:
    """A nucleus: haematoxylin added, eosin partly cleared under it."""
    res = _stamp(h, cx, cy, a, b, theta, value, rng, irregular, texture=texture)
    if res is not None:
        sy, sx, mask = res
        e[sy, sx] *= 1.0 - clear * mask


# -- tissue classes ------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> Drawing:
    h = 0.004 + 0.002 * _noise(rng, size, 20.0)
    e = 0.008 + 0.003 * _noise(rng, size, 12.0) + 0.0015 * _noise(rng, size, 1.5)
    return Drawing(np.clip(h, 0, None), np.clip(e, 0, None), 0, 0)


def _tumour(rng: np.random.Generator, size: int) -> Drawing:
    e = 0.16 + 0.035 * _noise(rng, size, 6.0) + 0.025 * _noise(rng, size, 1.3)
    h = 0.10 + 0.035 * _noise(rng, size, 5.0)
    spacing = rng.uniform(28.0, 36.0)
    pts = _jittered_grid(rng, size, spacing, 0.22, margin=12)
    tex = _chromatin(rng, size, coarse=1.4)
    base = rng.uniform(0.75, 1.05)
    for cx, cy in pts:
        big = rng.random() < 0.06
        a = rng.uniform(8.5, 13.0) * (1.5 if big else 1.0)
        b = a * rng.uniform(0.65, 0.95)
        _nucleus(
            h, e, rng, cx, cy, a, b, rng.uniform(0, math.pi), base * rng.uniform(0.8, 1.25), rng.uniform(0.08, 0.2), tex
        )
        if rng.random() < 0.6:  # prominent nucleolus
            _stamp(h, cx + rng.normal(0, 2), cy + rng.normal(0, 2), 2.0, 1.7, 0.0, 0.7)
    return Drawing(np.clip(h, 0, None), np.clip(e, 0, None), _inside(pts, size), 0)


def _mitosis(h: np.ndarray, e: np.ndarray, rng: np.random.Generator, cx: float, cy: float) -> None:
    """A mitosis-like figure about 10 um (20 px) across: dark clumped chromatin in a halo."""
    halo = _stamp(np.zeros_like(h), cx, cy, 15.0, 13.0, rng.uniform(0, math.pi), 1.0, edge=3.0)
    if halo is not None:
        sy, sx, m = halo
        h[sy, sx] *= 1.0 - 0.85 * m
        e[sy, sx] = e[sy, sx] * (1.0 - 0.5 * m) + 0.03 * m
    kind = rng.integers(3)
    theta = rng.uniform(0, math.pi)
    c, s = math.cos(theta), math.sin(theta)
    blobs: list[tuple[float, float]] = []
    if kind == 0:  # metaphase plate: a bar of clumps
        length = rng.uniform(17, 23)
        for t in np.linspace(-length / 2, length / 2, int(rng.integers(9, 15))):
            off = rng.normal(0, 1.8)
            blobs.append((cx + t * c - off * s, cy + t * s + off * c))
    elif kind == 1:  # prophase / ring of clumped chromatin
        radius = rng.uniform(5.5, 8.5)
        for phi in np.linspace(0, 2 * math.pi, int(rng.integers(10, 15)), endpoint=False):
            rr = radius + rng.normal(0, 1.2)
            blobs.append((cx + rr * math.cos(phi), cy + rr * math.sin(phi)))
        blobs += [(cx + rng.normal(0, 2.5), cy + rng.normal(0, 2.5)) for _ in range(3)]
    else:  # anaphase: two parallel bars
        gap = rng.uniform(5.5, 7.5)
        for side in (-1, 1):
            for t in np.linspace(-8, 8, int(rng.integers(6, 10))):
                off = side * gap + rng.normal(0, 1.2)
                blobs.append((cx + t * c - off * s, cy + t * s + off * c))
    for bx, by in blobs:
        a = rng.uniform(1.8, 3.2)
        _stamp(
            h,
            bx,
            by,
            a,
            a * rng.uniform(0.6, 1.0),
            rng.uniform(0, math.pi),
            rng.uniform(1.6, 2.3),
            rng,
            0.15,
            edge=0.8,
            mode="max",
        )


def _lymphocytes(rng: np.random.Generator, size: int) -> Drawing:
    e = 0.07 + 0.02 * _noise(rng, size, 4.0)
    h = 0.06 + 0.02 * _noise(rng, size, 6.0)
    pts = _jittered_grid(rng, size, rng.uniform(13.0, 16.0), 0.2, margin=6)
    keep = rng.random(len(pts)) > 0.06
    pts = pts[keep]
    tex = _chromatin(rng, size, coarse=0.8)
    for cx, cy in pts:
        r = rng.uniform(5.0, 6.8)
        _nucleus(h, e, rng, cx, cy, r, r * rng.uniform(0.85, 1.0), 0.0, rng.uniform(1.25, 1.6), 0.05, tex, clear=0.7)
    return Drawing(np.clip(h, 0, None), np.clip(e, 0, None), _inside(pts, size), 0)


def _voronoi(size: int, sites: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances (size, size) to the nearest and second-nearest of ``sites`` (n, 2) (x, y)."""
    yy, xx = np.mgrid[0:size, 0:size]
    grid = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
    d, _ = cKDTree(sites).query(grid, k=2)
    return d[:, 0].reshape(size, size), d[:, 1].reshape(size, size)


def _normal(rng: np.random.Generator, size: int) -> Drawing:
    """Hepatocyte-like parenchyma: polygonal pink cells, one small round central nucleus."""
    spacing = rng.uniform(42.0, 52.0)
    sites = _jittered_grid(rng, size, spacing, 0.16, margin=spacing)
    d1, d2 = _voronoi(size, sites)
    gap = d2 - d1
    e = 0.27 + 0.04 * _noise(rng, size, 1.2) + 0.03 * _noise(rng, size, 10.0)
    e += 0.07 * np.exp(-((gap / 1.6) ** 2))
    h = 0.05 + 0.015 * _noise(rng, size, 3.0)
    sinus = (gap < rng.uniform(3.0, 4.5)) & (_noise(rng, size, 14.0) > 0.9)
    e[sinus] = 0.03
    h[sinus] = 0.01
    tex = _chromatin(rng, size, coarse=0.9)
    count = 0
    for cx, cy in sites:
        centres = [(cx, cy)]
        if rng.random() < 0.08:  # binucleate
            off = rng.uniform(6, 8)
            centres = [(cx - off, cy), (cx + off, cy)]
        for nx, ny in centres:
            nx, ny = nx + rng.normal(0, 1.2), ny + rng.normal(0, 1.2)
            r = rng.uniform(5.5, 7.0)
            _nucleus(h, e, rng, nx, ny, r, r * rng.uniform(0.9, 1.0), 0.0, rng.uniform(0.7, 0.85), 0.03, tex, clear=0.4)
            _stamp(h, nx, ny, 1.6, 1.6, 0.0, 0.55)
            count += int(0 <= nx < size and 0 <= ny < size)
    return Drawing(np.clip(h, 0, None), np.clip(e, 0, None), count, 0)


def _stroma(rng: np.random.Generator, size: int) -> Drawing:
    """Collagenous stroma: wavy pink fibres, clefts and sparse elongated nuclei."""
    angle = rng.uniform(0, math.pi)
    fib = _noise(rng, size, rng.uniform(1.0, 1.6), along=rng.uniform(14, 26), angle=angle)
    bundles = _noise(rng, size, 10.0, along=40.0, angle=angle)
    e = 0.21 + 0.07 * fib + 0.04 * bundles
    e[(fib + 0.6 * bundles) < -1.3] *= 0.25  # clefts between fibres
    h = 0.025 + 0.01 * _noise(rng, size, 8.0)
    n = int(rng.poisson(rng.uniform(7, 14) * (size / 256) ** 2))
    tex = _chromatin(rng, size, coarse=0.7)
    xy = rng.uniform(0, size, (n, 2))
    for cx, cy in xy:
        a = rng.uniform(7.0, 11.0)
        _nucleus(
            h,
            e,
            rng,
            cx,
            cy,
            a,
            rng.uniform(1.8, 2.8),
            angle + rng.normal(0, 0.15),
            rng.uniform(0.9, 1.2),
            0.05,
            tex,
            clear=0.5,
        )
    return Drawing(np.clip(h, 0, None), np.clip(e, 0, None), n, 0)


def _fat(rng: np.random.Generator, size: int) -> Drawing:
    """Adipose tissue: large empty vacuoles with thin pink membranes."""
    spacing = rng.uniform(80.0, 125.0)
    sites = _jittered_grid(rng, size, spacing, 0.25, margin=spacing)
    d1, d2 = _voronoi(size, sites)
    mem = np.exp(-(((d2 - d1) / rng.uniform(1.0, 1.6)) ** 2))
    e = 0.01 + 0.003 * _noise(rng, size, 6.0) + 0.28 * mem
    h = 0.005 + 0.02 * mem
    count = 0
    edge_pixels = np.argwhere(mem > 0.8)
    if len(edge_pixels):
        for _ in range(int(rng.integers(0, max(1, 4 * (size // 128))))):
            py, px = edge_pixels[rng.integers(len(edge_pixels))]
            _nucleus(
                h,
                e,
                rng,
                float(px),
                float(py),
                rng.uniform(5, 7),
                1.8,
                rng.uniform(0, math.pi),
                0.9,
                0.0,
                np.ones_like(h),
            )
            count += 1
    return Drawing(np.clip(h, 0, None), np.clip(e, 0, None), count, 0)


def _necrosis(rng: np.random.Generator, size: int) -> Drawing:
    """Necrosis: pale smudged eosinophilic debris with karyorrhectic dust."""
    e = 0.13 + 0.04 * _noise(rng, size, 8.0) + 0.025 * _noise(rng, size, 2.0)
    h = np.clip(0.05 + 0.04 * _noise(rng, size, 10.0), 0.0, None)
    # ghosts of cells: faint rings
    for cx, cy in _jittered_grid(rng, size, 30.0, 0.3, margin=10):
        if rng.random() < 0.5:
            r = rng.uniform(7, 11)
            _stamp(h, cx, cy, r, r * 0.85, rng.uniform(0, math.pi), 0.12, rng, 0.15, edge=3.0)
    n_clusters = int(rng.integers(6, 14) * (size / 256) ** 2) + 1
    for _ in range(n_clusters):
        ccx, ccy = rng.uniform(0, size, 2)
        for _ in range(int(rng.integers(4, 14))):
            a = rng.uniform(0.8, 2.4)
            _stamp(
                h,
                ccx + rng.normal(0, 9),
                ccy + rng.normal(0, 9),
                a,
                a,
                0.0,
                rng.uniform(0.8, 1.4),
                edge=0.7,
                mode="max",
            )
    return Drawing(np.clip(h, 0, None), np.clip(e, 0, None), 0, 0)


_DRAW = {
    "background": _background,
    "tumour": _tumour,
    "stroma": _stroma,
    "normal": _normal,
    "lymphocytes": _lymphocytes,
    "fat": _fat,
    "necrosis": _necrosis,
}


def draw_tile(cls: str, rng: np.random.Generator, size: int = 256, mitoses: int = 0, margin: int = 16) -> Drawing:
    """Draw one texture of class ``cls`` (a name in :data:`CLASSES`), ``size`` x ``size`` px.

    ``mitoses`` mitosis-like figures (each about 20 px across) are drawn with their centre
    at least ``margin`` px inside the image and apart from each other; they are counted
    both in :attr:`Drawing.mitoses` and as nuclei.  Any class accepts them, though only
    tumour has them in generated slides.
    """
    if cls not in _DRAW:
        raise ValueError(f"unknown tissue class {cls!r}; expected one of {', '.join(CLASSES)}")
    d = _DRAW[cls](rng, size)
    placed: list[tuple[float, float]] = []
    for _ in range(mitoses):
        for _try in range(50):
            cx, cy = rng.uniform(margin, size - margin, 2)
            if all((cx - px) ** 2 + (cy - py) ** 2 > 34.0**2 for px, py in placed):
                break
        placed.append((cx, cy))
        _mitosis(d.h, d.e, rng, cx, cy)
    d.mitoses = len(placed)
    d.nuclei += len(placed)
    return d
