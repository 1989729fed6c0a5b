"""Where the evidence lies: pictures of slides, compressed slides and trained runs.

- ``_pictures``: tissue overlays, code maps (PCA colours), side-by-side panels, grids of
  tiles, PNG writing;
- ``_heatmap``: per-cell evidence maps of a run's models on a compressed slide (Grad-CAM,
  attention, input x gradient), averaged over fold models and dihedral variants;
- ``_overlays``: those maps as a PNG over the thumbnail, a pyramidal TIFF covering the
  slide's physical extent and a QuPath GeoJSON of the grid cells;
- ``_report``: one self-contained HTML page per run (metrics, curves, calibration,
  survival analysis, a heatmap gallery).

This layer reads runs and stores; it never trains.
"""

from nic.explain._pictures import image_grid, pca_rgb, save_png, side_by_side, store_picture, tissue_overlay

__all__ = [
    "save_png",
    "tissue_overlay",
    "side_by_side",
    "image_grid",
    "pca_rgb",
    "store_picture",
    "Heatmap",
    "slide_heatmap",
    "heatmap_png",
    "write_heatmap_tiff",
    "heatmap_geojson",
    "write_heatmaps",
    "write_report",
]


def __getattr__(name: str):  # torch-heavy parts load on first use
    if name in ("Heatmap", "slide_heatmap"):
        from nic.explain import _heatmap

        return getattr(_heatmap, name)
    if name in ("heatmap_png", "write_heatmap_tiff", "heatmap_geojson", "write_heatmaps"):
        from nic.explain import _overlays

        return getattr(_overlays, name)
    if name == "write_report":
        from nic.explain import _report

        return _report.write_report
    raise AttributeError(f"module 'nic.explain' has no attribute {name!r}")
