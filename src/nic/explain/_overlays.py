"""Heatmaps placed on the slide: a PNG over the thumbnail, a pyramidal TIFF, a GeoJSON.

Alignment comes from the store's attributes alone (:class:`nic.store.StoreAttrs`): cell
(row, col) covers level-0 ``origin + (col, row) * step`` to that plus ``patch_level0``.
A picture at ``mpp`` um/px takes, for each of its pixels, the value of the cell under
the pixel's centre (in level-0 coordinates), so the map stays exact at any scale and for
grids whose origin is not 0.

- :func:`heatmap_png`: the slide's thumbnail, the map over it (half opaque) and a colour bar;
- :func:`write_heatmap_tiff`: the coloured map as a tiled RGB pyramidal TIFF covering the
  slide's physical extent (level-0 size x um/px), pixel size in the resolution tags
  (centimetres), so OpenSlide and QuPath open it and it lies over the slide;
- :func:`heatmap_geojson`: one polygon per tissue cell in level-0 pixels with the value as
  a QuPath measurement (File > Import objects in QuPath).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from nic.errors import OutputError, StoreError
from nic.explain._heatmap import Heatmap
from nic.store import StoreAttrs

__all__ = ["colour_scale", "rasterise", "colourise", "heatmap_png", "write_heatmap_tiff", "heatmap_geojson"]

#: TIFF pixels per grid cell (at most; fewer when the slide would exceed MAX_TIFF_SIDE)
TIFF_PX_PER_CELL = 8
MAX_TIFF_SIDE = 16384


def _geometry(meta: StoreAttrs) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    if meta.origin is None or meta.step is None or meta.slide_dimensions is None or meta.slide_mpp is None:
        raise StoreError("the store has no grid geometry (origin, step, slide size and um/px); compress it with nic")
    patch = meta.patch_level0 or meta.step
    return meta.origin, meta.step, patch


def rasterise(values: np.ndarray, meta: StoreAttrs, mpp: float) -> np.ndarray:
    """The map (H, W) as an image of the whole slide at ``mpp`` um/px (NaN off the cells).

    The image covers the slide's level-0 extent: ``round(size * slide_mpp / mpp)`` pixels
    per axis; pixel ``(i, j)`` takes the cell under its centre.
    """
    (ox, oy), (sx, sy), (px, py) = _geometry(meta)
    (w0, h0), (mx, my) = meta.slide_dimensions, meta.slide_mpp  # type: ignore[misc]
    w, h = max(1, round(w0 * mx / mpp)), max(1, round(h0 * my / mpp))

    def index(n: int, scale: float, origin: float, step: float, patch: float, cells: int) -> np.ndarray:
        centre = (np.arange(n) + 0.5) * scale  # level-0 pixels
        cell = np.floor((centre - origin) / step).astype(np.int64)
        inside = (cell >= 0) & (cell < cells) & (centre - origin - cell * step < patch)
        return np.where(inside, cell, -1)

    rows = index(h, mpp / my, oy, sy, py, values.shape[0])
    cols = index(w, mpp / mx, ox, sx, px, values.shape[1])
    out = values[np.ix_(np.maximum(rows, 0), np.maximum(cols, 0))].astype(np.float64)
    out[rows < 0, :] = np.nan
    out[:, cols < 0] = np.nan
    return out


def colour_scale(values: np.ndarray, signed: bool) -> tuple[str, float, float]:
    """(matplotlib colour map, vmin, vmax): symmetric around 0 for signed maps, the 99th
    percentile of the magnitudes as the limit (one extreme cell does not wash out the rest)."""
    v = values[np.isfinite(values)]
    top = float(np.percentile(np.abs(v), 99)) if len(v) else 1.0
    top = top if top > 0 else 1.0
    if signed:
        return "RdBu_r", -top, top
    return "viridis", 0.0, top


def colourise(image: np.ndarray, cmap: str, vmin: float, vmax: float, background: int = 255) -> np.ndarray:
    """float (H, W) with NaN -> uint8 RGB (H, W, 3); NaN becomes ``background``."""
    import matplotlib

    colours = matplotlib.colormaps[cmap]
    z = np.clip((np.nan_to_num(image, nan=vmin) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgb = np.rint(colours(z)[..., :3] * 255).astype(np.uint8)
    rgb[~np.isfinite(image)] = background
    return rgb


def _slide_thumbnail(meta: StoreAttrs, mpp: float) -> np.ndarray | None:
    from nic.slide import open_slide

    path = Path(meta.slide_path) if meta.slide_path else None
    if path is None or not path.is_file():
        return None
    with open_slide(path, mpp=meta.slide_mpp) as slide:
        return np.asarray(slide.thumbnail(mpp))


def heatmap_png(hm: Heatmap, meta: StoreAttrs, out: str | Path, max_side: int = 1200, title: str = "") -> Path:
    """The thumbnail with the map over it and a colour bar, as a PNG (the map alone when
    the slide file named in the store is gone)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import Normalize

    _geometry(meta)  # first: a store without slide geometry gets the clear error, not an unpacking one
    (w0, h0), (mx, my) = meta.slide_dimensions, meta.slide_mpp  # type: ignore[misc]
    mpp = max(w0 * mx, h0 * my) / max_side
    image = rasterise(hm.values, meta, mpp)
    cmap, vmin, vmax = colour_scale(hm.values, hm.signed)
    thumb = _slide_thumbnail(meta, mpp)
    extent = (0, image.shape[1], image.shape[0], 0)
    # the figure is about max_side pixels wide, the map's own pixels shown one to one
    fig, ax = plt.subplots(figsize=(8, 8 * image.shape[0] / image.shape[1] + 0.6), dpi=max(50, max_side / 8))
    if thumb is not None:
        ax.imshow(thumb, extent=extent)
    masked = np.ma.masked_invalid(image)
    ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.55 if thumb is not None else 1.0, extent=extent,
              interpolation="nearest")  # fmt: skip
    ax.set_axis_off()
    sm = matplotlib.cm.ScalarMappable(norm=Normalize(vmin, vmax), cmap=cmap)
    bar = fig.colorbar(sm, ax=ax, fraction=0.035, pad=0.02)
    bar.set_label(f"{hm.output} evidence ({hm.method})" if hm.signed else f"attention ({hm.output})")
    ax.set_title(title or hm.slide_id, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_heatmap_tiff(hm: Heatmap, meta: StoreAttrs, out: str | Path, px_per_cell: int = TIFF_PX_PER_CELL) -> Path:
    """The coloured map as a tiled (256 px) RGB pyramidal TIFF over the slide's extent.

    Its um/px is the cell's side / ``px_per_cell`` (coarser if the image would exceed
    16,384 px); background is white.  The description holds the colour scale as JSON.
    """
    import tifffile

    (w0, h0), (mx, my) = meta.slide_dimensions, meta.slide_mpp  # type: ignore[misc]
    _, (sx, _sy), _ = _geometry(meta)
    mpp = sx * mx / px_per_cell
    mpp = max(mpp, max(w0 * mx, h0 * my) / MAX_TIFF_SIDE)
    image = rasterise(hm.values, meta, mpp)
    cmap, vmin, vmax = colour_scale(hm.values, hm.signed)
    level = colourise(image, cmap, vmin, vmax)
    desc = json.dumps({"nic_heatmap": {"slide": hm.slide_id, "output": hm.output, "method": hm.method,
                                       "colour_map": cmap, "vmin": vmin, "vmax": vmax, "mpp": mpp}})  # fmt: skip
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    with tifffile.TiffWriter(tmp) as tw:
        i = 0
        while True:
            scale = 2**i
            tw.write(level, tile=(256, 256), compression="zlib", photometric="rgb",
                     description=desc if i == 0 else None,
                     resolution=(1e4 / (mpp * scale), 1e4 / (mpp * scale)), resolutionunit="CENTIMETER",
                     subfiletype=1 if i else 0, metadata=None)  # fmt: skip
            if max(level.shape[:2]) <= 512:
                break
            h2, w2 = math.ceil(level.shape[0] / 2), math.ceil(level.shape[1] / 2)
            level = level[: 2 * h2 : 2, : 2 * w2 : 2]  # nearest: colours of the map stay exact
            i += 1
    tmp.replace(out)
    return out


def heatmap_geojson(hm: Heatmap, meta: StoreAttrs) -> dict[str, Any]:
    """A GeoJSON FeatureCollection: one square per tissue cell (level-0 pixels), the value
    under ``measurements`` (``heat``, ``row``, ``col``) as QuPath reads it."""
    (ox, oy), (sx, sy), (px, py) = _geometry(meta)
    feats = []
    for r, c in zip(*np.nonzero(np.isfinite(hm.values))):
        x0, y0 = ox + c * sx, oy + r * sy
        ring = [[x0, y0], [x0 + px, y0], [x0 + px, y0 + py], [x0, y0 + py], [x0, y0]]
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "tile",
                "name": f"{hm.slide_id} cell {r},{c}",
                "measurements": {"heat": float(hm.values[r, c]), "row": int(r), "col": int(c)},
            },
        })  # fmt: skip
    return {"type": "FeatureCollection", "features": feats}


#: the files one slide's heatmap is written as, after its slide id
MAP_FILES = (".heatmap.npy", ".png", ".heatmap.tiff", ".geojson")
#: what a heatmap folder records of the maps it holds: the run, method and output
MANIFEST = "heatmaps.json"


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _holds_maps(folder: Path) -> bool:
    """Whether ``folder`` holds heatmaps nic wrote and nothing else (what ``overwrite`` may replace)."""
    from nic._outputs import holds_only

    maps = (folder / MANIFEST).is_file() or any(folder.glob("*.heatmap.npy"))
    return maps and holds_only(folder, (MANIFEST,), MAP_FILES)


def _check_heatmap_folder(out: Path, made_by: dict[str, Any], slide_ids: list[str], overwrite: bool) -> bool:
    """Refuse ``out`` before any map is drawn when it already holds maps of these slides, or
    maps of another run, method or output (unless ``overwrite``); True when the folder is to
    be written whole (new, or replacing maps of another run), False when maps are added to
    those of the same run."""
    from nic._outputs import check_writable

    check_writable(out, folder=True)
    if not out.is_dir() or not any(out.iterdir()):
        return True
    if not _holds_maps(out):
        return True  # staged_folder refuses a folder of other files
    manifest = _read_manifest(out) or {}
    same = {k: manifest.get(k) for k in made_by} == made_by
    if not overwrite:
        taken = [sid for sid in slide_ids if any((out / f"{sid}{suffix}").exists() for suffix in MAP_FILES)]
        if taken:
            more = f" and {len(taken) - 5} more" if len(taken) > 5 else ""
            raise OutputError(
                f"{out}: already holds heatmaps of {', '.join(taken[:5])}{more}; pass `overwrite=True` to replace "
                "them, or choose another `out`"
            )
        if not same:
            was = manifest.get("run") or "a run it does not record"
            raise OutputError(
                f"{out}: holds heatmaps of {was} (method {manifest.get('method')}, output {manifest.get('output')}), "
                f"not of {made_by['run']} (method {made_by['method']}, output {made_by['output']}); choose another "
                "`out`, or pass `overwrite=True` to replace them"
            )
    return not same


def write_heatmaps(
    run: Any,
    sources: list[Any],
    out: str | Path,
    method: str = "auto",
    output: str | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """For each source: ``<slide>.png``, ``<slide>.heatmap.tiff``, ``<slide>.geojson`` and
    ``<slide>.heatmap.npy`` (the (H, W) map) in ``out``; returns one record per slide.

    ``out/heatmaps.json`` records the run, ``method`` and ``output`` the maps came from.
    Maps of further slides of the same run (and method and output) may be added to a
    folder; maps already there, or a folder of another run's maps, are refused before any
    work unless ``overwrite``.  A new folder, or one whose maps of another run are
    replaced, is built aside and swapped in whole at the end
    (:func:`nic._outputs.staged_folder`); each file is replaced whole.
    """
    import contextlib

    from nic._outputs import staged_folder, write_atomic
    from nic.explain._heatmap import slide_heatmap
    from nic.store import open_store

    out = Path(out)
    made_by = {"run": str(Path(run.path).resolve()), "method": method, "output": output}
    slide_ids = [src.slide_id for src in sources]
    whole = _check_heatmap_folder(out, made_by, slide_ids, overwrite)
    if whole:
        folder = staged_folder(out, overwrite, _holds_maps)
        slides_before: list[str] = []
    else:
        folder = contextlib.nullcontext(out)
        slides_before = list((_read_manifest(out) or {}).get("slides") or [])
    records = []
    with folder as dest:
        for src in sources:
            hm = slide_heatmap(run, src, method, output)
            meta = open_store(src.path, verify="none").meta
            sid = src.slide_id
            write_atomic(dest / f"{sid}.heatmap.npy", lambda tmp, v=hm.values: _save_npy(tmp, v))
            heatmap_png(hm, meta, dest / f"{sid}.png")
            write_heatmap_tiff(hm, meta, dest / f"{sid}.heatmap.tiff")
            geo = json.dumps(heatmap_geojson(hm, meta))
            write_atomic(dest / f"{sid}.geojson", lambda tmp, text=geo: tmp.write_text(text))
            records.append({"slide": sid, "png": str(out / f"{sid}.png"), "tiff": str(out / f"{sid}.heatmap.tiff"),
                            "geojson": str(out / f"{sid}.geojson"), "method": hm.method,
                            "output": hm.output})  # fmt: skip
        manifest = {**made_by, "slides": sorted({*slides_before, *slide_ids})}
        write_atomic(dest / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return records


def _save_npy(path: Path, values: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add .npy to the temporary name
        np.save(f, values)
