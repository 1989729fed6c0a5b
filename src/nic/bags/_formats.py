"""The feature-bag layouts of TRIDENT, CLAM and STAMP: reading one slide's bag, writing one.

What each tool writes (read from its own writer and reader):

- **TRIDENT** (mahmoodlab/TRIDENT ``trident/wsi_objects/WSI.py::extract_patch_features``,
  ``trident/IO.py::save_h5`` / ``coords_to_h5`` / ``read_coords``): ``<name>.h5`` with
  ``features`` (N, C) and ``coords`` (N, 2) int64, level-0 pixels of the patches'
  top-left corners (x, y).  ``coords`` attributes: ``patch_size`` (pixels at the target
  magnification), ``patch_size_level0`` (``patch_size * level0_magnification //
  target_magnification``), ``level0_magnification``, ``target_magnification``,
  ``overlap`` (pixels at the target magnification), ``name``, ``savetodir``,
  ``level0_width``, ``level0_height``.  ``features`` attributes: ``name``, ``savetodir``,
  ``encoder`` (the patch encoder's name).  TRIDENT turns a magnification into a pixel
  size as 10 / magnification um/px (``WSIPatcher``), so 20x is 0.5 um/px.
- **CLAM** (mahmoodlab/CLAM ``extract_features_fp.py``, ``utils/file_utils.py::save_hdf5``,
  ``wsi_core/WholeSlideImage.py::process_contour``, ``dataset_modules/dataset_generic.py``):
  ``h5_files/<slide_id>.h5`` with ``features`` (N, C) float32 and ``coords`` (N, 2)
  int32 level-0 top-left corners, no attributes; ``pt_files/<slide_id>.pt`` the same
  features as one torch tensor (no coordinates).  The patch geometry is in the patching
  step's ``patches/<slide_id>.h5``: ``coords`` with attributes ``patch_size`` (pixels at
  ``patch_level``), ``patch_level``, ``downsample`` (of that level, x and y),
  ``level_dim``, ``downsampled_level_dim``, ``name``, ``save_path``.  Each tissue
  contour has its own grid start, so a slide's patches need not share one grid.
- **STAMP** (KatherLab/STAMP ``src/stamp/preprocessing/__init__.py``,
  ``src/stamp/modeling/data.py::get_coords``): ``<slide>.h5`` with ``feats`` (N, C)
  float16 and ``coords`` (N, 2) float32 in micrometres from the slide's top-left corner;
  file attributes ``unit`` = "um", ``tile_size_um``, ``tile_size_px``, ``extractor``,
  ``stamp_version``, ``code_hash``, ``feat_type`` = "tile".  Level-0 pixels are
  ``coords / slide um/px``; a tile spans ``ceil(tile_size_um / slide um/px)`` level-0 pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nic.errors import DataError

__all__ = ["FORMATS", "Format", "Bag", "SlideInfo", "find_bags", "read_bag", "write_bag"]

Format = Literal["trident", "clam", "stamp"]
FORMATS: tuple[str, ...] = ("trident", "clam", "stamp")
#: The STAMP version written into exported files: the first with ``tile_size_um`` (STAMP
#: refuses files from a newer version than its own).
STAMP_VERSION = "2.1.0"


@dataclass(frozen=True)
class SlideInfo:
    """What is known of a bag's slide: level-0 um/px (x, y), (width, height), pyramid downsamples."""

    mpp: tuple[float, float] | None = None
    size: tuple[int, int] | None = None
    downsamples: tuple[float, ...] = ()


@dataclass
class Bag:
    """One slide's features as another tool wrote them, in nic's units.

    ``coords``: (N, 2) float64 level-0 top-left corners (x, y); ``features``: (N, C) as
    stored (read lazily by :meth:`read_features`); ``patch``: patch side in pixels at
    ``mpp`` (the extraction's nominal um/px, the same for every slide of one extraction);
    ``patch_level0`` and ``step_level0``: level-0 pixels; ``size_level0``: the slide's
    level-0 (width, height) as the file records it; ``source_mpp``: the grid's actual
    um/px on this slide when the slide's pixel size is known.
    """

    slide_id: str
    path: Path
    format: str
    coords: np.ndarray
    n: int
    code_size: int
    patch: int
    mpp: float
    patch_level0: float
    step_level0: float | None
    extractor: str = ""
    size_level0: tuple[int, int] | None = None
    source_mpp: float | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    _features: tuple[Path, str] | None = None

    def read_features(self) -> np.ndarray:
        """(N, C) float32."""
        assert self._features is not None
        path, key = self._features
        if path.suffix == ".pt":
            import torch

            try:
                t = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several types for bad or unsafe files
                raise DataError(f"{path}: not a tensor file torch can load safely ({e})") from e
            if not isinstance(t, torch.Tensor):
                raise DataError(f"{path}: holds a {type(t).__name__}, not the features tensor CLAM writes")
            return t.float().numpy()
        import h5py

        with h5py.File(path, "r") as f:
            return np.asarray(f[key][()], dtype=np.float32)


def _plain(v: Any) -> Any:
    """An h5 attribute value as JSON-ready Python."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _attrs(obj: Any) -> dict[str, Any]:
    return {str(k): _plain(v) for k, v in obj.attrs.items()}


def _name(v: Any) -> str:
    s = "" if v is None else str(v)
    return "" if s in ("None", "none", "null") else s


def _stem(path: Path) -> str:
    from nic.store import slide_id_for

    return slide_id_for(path)


def find_bags(folder: Path, fmt: str) -> list[Path]:
    """The bag files of ``folder`` in ``fmt``'s layout, sorted (CLAM: ``h5_files`` or ``pt_files``)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of {fmt} feature files")
    if fmt == "clam":
        for sub, suffix in (("h5_files", ".h5"), ("pt_files", ".pt")):
            if (folder / sub).is_dir():
                return sorted(p for p in (folder / sub).iterdir() if p.suffix == suffix)
        return sorted(p for p in folder.iterdir() if p.suffix in (".h5", ".pt"))
    files = folder.rglob("*.h5") if fmt == "stamp" else folder.glob("*.h5")
    return sorted(p for p in files if p.is_file() and not p.name.startswith("."))


def _need(d: dict[str, Any], keys: tuple[str, ...], path: Path, fix: str) -> None:
    missing = [k for k in keys if d.get(k) in (None, "None")]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)} in its attributes; {fix}")


def _level0_mpp(info: SlideInfo, path: Path, what: str) -> float:
    if info.mpp is None:
        raise DataError(
            f"{path}: {what}; pass `slides` (the slide files, to read their um/px) or `mpp` (the slides' level-0 um/px)"
        )
    return float(info.mpp[0])


# ----------------------------------------------------------------------------- reading


def read_bag(
    path: Path,
    fmt: str,
    info: SlideInfo,
    *,
    patch_size: int | None = None,
    patches_dir: Path | None = None,
) -> Bag:
    """One bag in nic's units; :class:`DataError` naming the file and what to pass when the
    file leaves its geometry ambiguous.  ``patch_size``: patch side in level-0 pixels, for
    files that do not say it (CLAM without its ``patches`` folder)."""
    readers = {"trident": _read_trident, "clam": _read_clam, "stamp": _read_stamp}
    if fmt not in readers:
        raise DataError(f"unknown feature format {fmt!r}; expected one of {', '.join(FORMATS)}")
    try:
        if fmt == "clam":
            return _read_clam(path, info, patch_size, patches_dir)
        return readers[fmt](path, info)  # type: ignore[operator]
    except OSError as e:  # h5py and torch raise OSError for damaged or foreign files
        raise DataError(f"{path}: not a readable {fmt} feature file ({e}); copy it again") from e


def _datasets(f: Any, path: Path, feat_key: str, fmt: str) -> tuple[Any, Any]:
    if feat_key not in f or "coords" not in f:
        have = ", ".join(sorted(f.keys())) or "nothing"
        raise DataError(
            f"{path}: a {fmt} feature file needs datasets '{feat_key}' and 'coords' (it has {have}); "
            + ("a patching file holds coordinates only: give the features folder" if "coords" in f else "")
        )
    feats, coords = f[feat_key], f["coords"]
    if coords.shape[0] == 0:
        raise DataError(f"{path}: holds no patches ({fmt} found no tissue on its slide); move it out of the folder")
    if feats.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or feats.shape[0] != coords.shape[0]:
        raise DataError(
            f"{path}: '{feat_key}' {feats.shape} and 'coords' {coords.shape} are not (N, C) and (N, 2) of one N; "
            f"is it a {fmt} patch-feature file?"
        )
    return feats, coords


def _read_trident(path: Path, info: SlideInfo) -> Bag:
    import h5py

    with h5py.File(path, "r") as f:
        feats, coords = _datasets(f, path, "features", "TRIDENT")
        ca, fa = _attrs(coords), _attrs(feats)
        xy = np.asarray(coords[()], np.float64)
        n, c = feats.shape
    fix = "it is not a TRIDENT features file (for CLAM files pass `fmt=clam`)"
    _need(ca, ("patch_size", "target_magnification"), path, fix)
    patch = int(ca["patch_size"])
    target = float(ca["target_magnification"])
    if ca.get("patch_size_level0") not in (None, "None"):
        p0 = float(ca["patch_size_level0"])
    else:
        _need(ca, ("level0_magnification",), path, "pass the TRIDENT coordinates as TRIDENT wrote them")
        p0 = patch * float(ca["level0_magnification"]) / target
    if info.mpp and ca.get("level0_magnification") not in (None, "None"):
        # TRIDENT names level 0 by its um/px bucket: another bucket means another scan (or um/px)
        made, here = float(ca["level0_magnification"]), trident_magnification(float(info.mpp[0]))
        if not math.isclose(made, here, rel_tol=1e-3):
            raise DataError(
                f"{path}: made from a slide whose level 0 TRIDENT called {_number(made)}x, but its slide is "
                f"{float(info.mpp[0]):.4g} um/px ({_number(here)}x), so these codes are not at "
                f"{10.0 / target:g} um/px on it; give the slide they were made from, or its true um/px (`mpp`)"
            )
    overlap = float(ca.get("overlap") or 0) * p0 / patch
    size = None
    if ca.get("level0_width") not in (None, "None") and ca.get("level0_height") not in (None, "None"):
        size = (int(ca["level0_width"]), int(ca["level0_height"]))
    extractor = _name(fa.get("encoder"))
    mpp = 10.0 / target  # TRIDENT's own rule (WSIPatcher: dst_pixel_size = 10 / dst_mag)
    source_mpp = float(info.mpp[0]) * p0 / patch if info.mpp else None
    return Bag(
        _stem(path), path, "trident", xy, n, c, patch, mpp, p0, p0 - overlap, extractor, size,
        source_mpp, {"format": "trident", "extractor": extractor}, {"coords": ca, "features": fa},
        (path, "features"),
    )  # fmt: skip


def _clam_geometry(path: Path, patches_dir: Path | None) -> dict[str, Any]:
    """The ``coords`` attributes of CLAM's patching file for this slide, or {}."""
    import h5py

    candidates = []
    if patches_dir is not None:
        candidates.append(patches_dir / f"{_stem(path)}.h5")
    root = path.parent.parent if path.parent.name in ("h5_files", "pt_files") else path.parent
    candidates.append(root / "patches" / f"{_stem(path)}.h5")
    for p in candidates:
        if p.is_file():
            with h5py.File(p, "r") as f:
                if "coords" in f:
                    return {**_attrs(f["coords"]), "_file": str(p), "_coords": np.asarray(f["coords"][()])}
    if patches_dir is not None:
        raise DataError(f"{patches_dir / (_stem(path) + '.h5')}: no CLAM patching file for {path.name}")
    return {}


def _read_clam(path: Path, info: SlideInfo, patch_size: int | None, patches_dir: Path | None) -> Bag:
    import h5py

    geo = _clam_geometry(path, patches_dir)
    if path.suffix == ".pt":
        if "_coords" not in geo:
            raise DataError(
                f"{path}: a CLAM .pt file holds features only; pass `patches_dir=DIR` (CLAM's patches folder, whose "
                "coords give each row's position) or import the h5_files folder"
            )
        xy = np.asarray(geo["_coords"], np.float64)
        import torch

        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for bad or unsafe files
            raise DataError(f"{path}: not a tensor file torch can load safely ({e})") from e
        n, c = (int(t.shape[0]), int(t.shape[1])) if getattr(t, "ndim", 0) == 2 else (-1, -1)
        if n != len(xy):
            raise DataError(f"{path}: {n} feature rows but {len(xy)} coordinates in {geo['_file']}; not one slide")
        feats_ref: tuple[Path, str] = (path, "")
        own: dict[str, Any] = {}
    else:
        with h5py.File(path, "r") as f:
            feats, coords = _datasets(f, path, "features", "CLAM")
            xy = np.asarray(coords[()], np.float64)
            n, c = feats.shape
            own = _attrs(coords)
        feats_ref = (path, "features")
    attrs = {k: v for k, v in {**geo, **own}.items() if not k.startswith("_coords")}
    if attrs.get("patch_size") not in (None, "None"):
        ps = int(attrs["patch_size"])
        if attrs.get("downsample") is not None:
            ds = attrs["downsample"]
            ds = float(ds[0]) if isinstance(ds, list) else float(ds)
        elif attrs.get("patch_level") is not None:
            level = int(attrs["patch_level"])
            if not info.downsamples:
                raise DataError(
                    f"{path}: CLAM gives pyramid level {level}, not its downsample or um/px; pass `slides` "
                    "(the slide files) so the level can be read"
                )
            if level >= len(info.downsamples):
                raise DataError(f"{path}: patch level {level} but the slide has {len(info.downsamples)} levels")
            ds = info.downsamples[level]
        else:
            ds = 1.0
        ds = float(int(ds)) if ds >= 1 else ds  # CLAM steps by int(downsample)
        p0 = ps * ds
        mpp0 = _level0_mpp(info, path, f"CLAM records a pyramid level (downsample {ds:g}), not um/px")
    elif patch_size is not None:
        p0, ps, ds = float(patch_size), int(patch_size), 1.0
        mpp0 = _level0_mpp(info, path, "CLAM feature files do not record um/px")
    else:
        raise DataError(
            f"{path}: CLAM feature files carry no patch size; pass `patches_dir=DIR` (CLAM's patches folder with "
            "the coords attributes) or `patch_size=PX` (the patch side in level-0 pixels)"
        )
    actual = mpp0 * ds
    mpp = float(f"{actual:.2g}")  # nominal: the same for all slides scanned alike (0.499 and 0.502 -> 0.5)
    size = None
    if int(attrs.get("patch_level", 0) or 0) == 0 and attrs.get("level_dim") is not None:
        size = (int(attrs["level_dim"][0]), int(attrs["level_dim"][1]))
    return Bag(
        _stem(path), path, "clam", xy, n, c, ps, mpp, p0, None, "", size, actual,
        {"format": "clam"}, {"coords": {k: v for k, v in attrs.items() if k != "_file"},
                             "patches_file": attrs.get("_file", "")},
        feats_ref,
    )  # fmt: skip


def _read_stamp(path: Path, info: SlideInfo) -> Bag:
    import h5py

    with h5py.File(path, "r") as f:
        key = "feats" if "feats" in f else "patch_embeddings"
        feats, coords = _datasets(f, path, key, "STAMP")
        fa = _attrs(f)
        xy_um = np.asarray(coords[()], np.float64)
        n, c = feats.shape
    if str(fa.get("feat_type", "tile")) != "tile":
        raise DataError(f"{path}: a STAMP {fa['feat_type']}-level feature file; nic imports tile features")
    tile_um = fa.get("tile_size_um") or (fa.get("tile_size") if fa.get("unit") == "um" else None)
    if tile_um in (None, "None"):
        raise DataError(
            f"{path}: no tile_size_um attribute (a STAMP file from before 2.1 whose coordinate unit is a guess); "
            "extract its features again with a current STAMP"
        )
    if fa.get("tile_size_px") in (None, "None"):
        raise DataError(f"{path}: no tile_size_px attribute; extract its features again with a current STAMP")
    tile_um, tile_px = float(tile_um), int(fa["tile_size_px"])
    if info.mpp is None and fa.get("slide_mpp") is not None:  # written by nic's export
        info = SlideInfo((float(fa["slide_mpp"]),) * 2, info.size, info.downsamples)
    mpp0 = _level0_mpp(info, path, "STAMP coordinates are micrometres")
    mpp0_y = float(info.mpp[1]) if info.mpp else mpp0
    xy = xy_um / np.array([mpp0, mpp0_y])
    extractor = _name(fa.get("extractor"))
    ident = {"format": "stamp", "extractor": extractor, "code_hash": _name(fa.get("code_hash"))}
    actual = math.ceil(tile_um / mpp0 - 1e-6) * mpp0 / tile_px  # STAMP reads ceil(um / mpp) level-0 px per tile
    return Bag(
        _stem(path), path, "stamp", xy, n, c, tile_px, tile_um / tile_px, tile_um / mpp0, None, extractor,
        info.size, actual, ident, {"file": fa}, (path, key),
    )  # fmt: skip


# ----------------------------------------------------------------------------- writing


def trident_magnification(mpp: float) -> float:
    """TRIDENT's magnification of a level-0 pixel size (its buckets; 10 / um/px outside them)."""
    for limit, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < limit:
            return float(mag)
    return 10.0 / mpp


def _number(v: float) -> float | int:
    return int(round(v)) if abs(v - round(v)) < 1e-9 else float(v)


@dataclass(frozen=True)
class ExportItem:
    """One store's codes ready for a peer's layout: level-0 corners, codes and geometry."""

    slide_id: str
    coords: np.ndarray  # (N, 2) float64 level-0 (x, y)
    codes: np.ndarray  # (N, C) float32
    patch: int
    mpp: float
    patch_level0: float
    stride: int
    slide_mpp: float
    size_level0: tuple[int, int]
    encoder: str
    identity: str


def _save_h5(path: Path, datasets: dict[str, np.ndarray], attrs: dict[str, dict[str, Any]]) -> None:
    """Write datasets chunked along the first axis, resizable, like the peers' own writers."""
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for key, val in datasets.items():
            chunks = (max(1, min(len(val), 32)), *val.shape[1:]) if len(val) else None
            d = f.create_dataset(key, data=val, maxshape=(None, *val.shape[1:]), chunks=chunks or True)
            for k, v in attrs.get(key, {}).items():
                d.attrs[k] = v
        for k, v in attrs.get("/", {}).items():
            f.attrs[k] = v
    tmp.replace(path)


def write_bag(item: ExportItem, fmt: str, out: Path) -> list[Path]:
    """Write one slide in ``fmt``'s layout under ``out``; returns the files written."""
    it = item
    if fmt == "trident":
        src = trident_magnification(it.slide_mpp)
        target = 10.0 / it.mpp
        coords_attrs = {
            "patch_size": it.patch, "patch_size_level0": int(round(it.patch_level0)),
            "level0_magnification": _number(src), "target_magnification": _number(target),
            "overlap": int(it.patch - it.stride), "name": it.slide_id, "savetodir": str(out),
            "level0_width": it.size_level0[0], "level0_height": it.size_level0[1],
        }  # fmt: skip
        p = out / f"{it.slide_id}.h5"
        _save_h5(
            p,
            {"features": it.codes.astype(np.float32), "coords": np.rint(it.coords).astype(np.int64)},
            {"coords": coords_attrs, "features": {"name": it.slide_id, "savetodir": str(out), "encoder": it.encoder}},
        )
        return [p]
    if fmt == "clam":
        import torch

        for sub in ("h5_files", "pt_files", "patches"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        xy = np.rint(it.coords).astype(np.int32)
        h5 = out / "h5_files" / f"{it.slide_id}.h5"
        _save_h5(h5, {"features": it.codes.astype(np.float32), "coords": xy}, {})
        pt = out / "pt_files" / f"{it.slide_id}.pt"
        torch.save(torch.from_numpy(it.codes.astype(np.float32)), pt)
        patches = out / "patches" / f"{it.slide_id}.h5"
        w, h = it.size_level0
        geo = {
            "patch_size": int(round(it.patch_level0)), "patch_level": 0, "downsample": np.array([1.0, 1.0]),
            "downsampled_level_dim": np.array([w, h]), "level_dim": np.array([w, h]), "name": it.slide_id,
            "save_path": str(out / "patches"),
        }  # fmt: skip
        _save_h5(patches, {"coords": xy}, {"coords": geo})
        return [h5, pt, patches]
    if fmt == "stamp":
        p = out / f"{it.slide_id}.h5"
        root = {
            "stamp_version": STAMP_VERSION, "extractor": it.encoder, "unit": "um",
            "tile_size_um": float(it.patch * it.mpp), "tile_size_px": int(it.patch), "code_hash": it.identity[:8],
            "feat_type": "tile", "slide_mpp": float(it.slide_mpp),
        }  # fmt: skip
        coords_um = (it.coords * it.slide_mpp).astype(np.float32)
        _save_h5(p, {"coords": coords_um, "feats": it.codes.astype(np.float16)}, {"/": root})
        return [p]
    raise DataError(f"unknown feature format {fmt!r}; expected one of {', '.join(FORMATS)}")


def identity_checksum(identity: dict[str, Any]) -> str:
    """sha256 of an extraction's identity (format, extractor, settings): equal for every bag of one run."""
    import hashlib

    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
