"""The compressed-slide store: creation, the ``complete`` contract, reading back."""

from __future__ import annotations

import numpy as np
import pytest

from nic.errors import StoreError
from nic.store import (
    FORMAT,
    create_store,
    is_complete,
    list_stores,
    mark_complete,
    open_store,
    slide_id_for,
    store_path,
)


def _tissue(h: int = 5, w: int = 7) -> np.ndarray:
    t = np.zeros((h, w), bool)
    t[1:4, 2:6] = True
    return t


def test_new_store_is_unfinished_and_all_zero(tmp_path):
    p = store_path(tmp_path, "s1")
    feats = create_store(p, 16, (5, 7), _tissue(), {"mpp": 0.5})
    assert feats.shape == (16, 5, 7) and feats.dtype == np.float16
    assert not np.any(feats[...])
    assert not is_complete(p)
    with pytest.raises(StoreError, match="unfinished"):
        open_store(p)


def test_complete_store_round_trip(tmp_path):
    p = store_path(tmp_path, "s1")
    tissue = _tissue()
    feats = create_store(p, 4, (5, 7), tissue, {"mpp": 0.5, "patch": 128})
    codes = np.random.default_rng(0).normal(size=(4, 5, 7)).astype(np.float16) * tissue
    feats[...] = codes
    mark_complete(p, {"patches": int(tissue.sum())})
    assert is_complete(p)
    s = open_store(p)
    assert s.slide_id == "s1" and s.variants == 1 and s.code_size == 4 and s.grid_shape == (5, 7)
    assert s.attrs["format"] == FORMAT and s.attrs["complete"] is True and s.attrs["patches"] == tissue.sum()
    np.testing.assert_array_equal(s.tissue, tissue)
    np.testing.assert_array_equal(s.load(), codes.astype(np.float32))
    assert s.load(None).shape == (1, 4, 5, 7)


def test_dihedral_store_shape(tmp_path):
    p = store_path(tmp_path, "d")
    feats = create_store(p, 3, (2, 2), np.ones((2, 2), bool), {}, variants=8)
    assert feats.shape == (8, 3, 2, 2) and feats.chunks[0] == 1
    feats[5] = np.full((3, 2, 2), 2.0, np.float16)
    mark_complete(p)
    s = open_store(p)
    assert s.variants == 8 and s.code_size == 3
    assert s.load(5).max() == 2.0 and s.load(0).max() == 0.0
    assert s.load(None).shape == (8, 3, 2, 2)


def test_create_store_replaces_an_unfinished_store(tmp_path):
    p = store_path(tmp_path, "s")
    f = create_store(p, 2, (2, 2), np.ones((2, 2), bool), {"a": 1})
    f[...] = 1
    f = create_store(p, 2, (3, 3), np.ones((3, 3), bool), {"b": 2})
    assert f.shape == (2, 3, 3) and not np.any(f[...])


def test_mismatched_tissue_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        create_store(tmp_path / "x.zarr", 2, (3, 3), np.ones((2, 2), bool), {})


def test_foreign_or_missing_store(tmp_path):
    import zarr

    with pytest.raises(StoreError, match="no such compressed slide"):
        open_store(tmp_path / "none.zarr")
    assert not is_complete(tmp_path / "none.zarr")
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.attrs["complete"] = True
    with pytest.raises(StoreError, match="not a nic compressed slide"):
        open_store(tmp_path / "other.zarr")


def test_list_stores_and_ids(tmp_path):
    for name in ("b", "a"):
        create_store(store_path(tmp_path, name), 1, (1, 1), np.ones((1, 1), bool), {})
    (tmp_path / "a.zarr.lock").write_text("pid 1")
    assert [p.name for p in list_stores(tmp_path)] == ["a.zarr", "b.zarr"]
    assert slide_id_for("/x/TCGA-01.svs") == "TCGA-01"
    assert slide_id_for("scan.ome.tiff") == "scan"
    with pytest.raises(StoreError):
        list_stores(tmp_path / "missing")
