"""Patch datasets, group splits, nucleus annotations and multitask sampling."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nic.errors import DataError
from nic.patches import (
    MultitaskDataset,
    PatchDataset,
    count_in_windows,
    group_split,
    load_patch,
    multitask_sampler,
    nuclei_patch_dataset,
    pair_images_annotations,
    parse_dataset_spec,
    read_nuclei,
    read_nuclei_mask,
    read_nuclei_xml,
    read_patch_table,
    task_weights,
)
from nic.patches._nuclei import polygon_centroid


@pytest.fixture(scope="module")
def monuseg(shared_data: Path) -> Path:
    return shared_data / "monuseg"


@pytest.fixture(scope="module")
def lc25000(shared_data: Path) -> Path:
    return shared_data / "patches" / "lc25000_lung_224"


def _img(path: Path, size: tuple[int, int] = (40, 30), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((size[1], size[0], 3), value, np.uint8)
    a[:, : size[0] // 2, 0] = 250  # left half reddish: shows crops and flips
    Image.fromarray(a).save(path)
    return path


def _csv(path: Path, rows: list[list[object]], header: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ----------------------------------------------------------------------------- specs and tables


def test_parse_dataset_spec() -> None:
    s = parse_dataset_spec("regr:/data/n.csv?mpp=0.25&group=slide&label=density&weight=2", extra=("weight",))
    assert (s.kind, s.path, s.mpp, s.group, s.label, s.options) == (
        "regr",
        Path("/data/n.csv"),
        0.25,
        "slide",
        "density",
        {"weight": "2"},
    )
    assert parse_dataset_spec("class:rel/folder").kind == "class"
    assert parse_dataset_spec("/abs/x.csv").kind is None
    for bad in ("", "tissue:/x", "class:", "class:/x?mpp=abc", "class:/x?mpp=-1"):
        with pytest.raises(DataError):
            parse_dataset_spec(bad)


def test_dataset_spec_refuses_unknown_keys(tmp_path: Path) -> None:
    # a misspelt key used to be dropped, and the probe then split patch by patch
    for bad, key in [("x.csv?grp=slide", "grp"), ("x.csv?MPP=0.25&group=slide", "MPP"), ("x.csv?weight=2", "weight")]:
        with pytest.raises(DataError, match=f"unknown key\\(s\\) {key}; known: mpp, group, label, path"):
            parse_dataset_spec(bad)
        with pytest.raises(DataError, match="unknown key"):
            read_patch_table(bad)


def test_read_csv_classes_groups_and_regression(tmp_path: Path) -> None:
    for i in range(4):
        _img(tmp_path / f"p{i}.png")
    t = read_patch_table(
        _csv(
            tmp_path / "c.csv",
            [[f"p{i}.png", "ab"[i % 2], f"g{i // 2}"] for i in range(4)],
            ["path", "label", "source_group"],
        )
    )
    assert t.kind == "class" and t.classes == ("a", "b") and list(t.labels) == [0, 1, 0, 1]
    assert list(t.groups) == ["g0", "g0", "g1", "g1"] and t.num_outputs == 2
    r = read_patch_table(_csv(tmp_path / "r.csv", [[f"p{i}.png", 0.5 * i + 0.1] for i in range(4)], ["path", "label"]))
    assert r.kind == "regr" and r.labels.dtype == np.float32 and r.groups is None and r.num_outputs == 1
    # whole numbers are classes unless the spec says regr
    ints = _csv(tmp_path / "i.csv", [[f"p{i}.png", i] for i in range(4)], ["path", "label"])
    assert read_patch_table(ints).kind == "class"
    assert read_patch_table(f"regr:{ints}").kind == "regr"


def test_read_folder_and_labels_csv_preference(tmp_path: Path, lc25000: Path) -> None:
    for c in ("tumour", "stroma"):
        for i in range(2):
            _img(tmp_path / "ds" / c / f"{i}.png")
    t = read_patch_table(f"class:{tmp_path / 'ds'}?mpp=0.5")
    assert t.classes == ("stroma", "tumour") and len(t) == 4 and t.mpp == 0.5 and t.groups is None
    with pytest.raises(DataError, match="classification"):
        read_patch_table(f"regr:{tmp_path / 'ds'}")
    # LC25000's folder holds class folders and a labels.csv with groups: the CSV wins
    lc = read_patch_table(lc25000)
    assert lc.groups is not None and len(np.unique(lc.groups)) == 450 and len(lc) == 1800


def test_class_folders_refuse_columns_they_cannot_have(tmp_path: Path) -> None:
    import dataclasses

    for c in ("a", "b"):
        for i in range(2):
            _img(tmp_path / "ds" / c / f"slide{i}.png")
    for spec in (f"class:{tmp_path / 'ds'}?group=slide", f"{tmp_path / 'ds'}?label=tissue"):
        with pytest.raises(DataError, match="class folders has no columns"):
            read_patch_table(spec)
    with pytest.raises(DataError, match="group 'patient'"):  # what `nic probe --group-col patient` builds
        read_patch_table(dataclasses.replace(parse_dataset_spec(tmp_path / "ds"), group="patient"))
    # a labels.csv beside the class folders has columns: the group is read from it
    rows = [[f"{c}/slide{i}.png", c, f"s{i}"] for c in "ab" for i in range(2)]
    _csv(tmp_path / "ds" / "labels.csv", rows, ["path", "label", "slide"])
    assert list(read_patch_table(f"{tmp_path / 'ds'}?group=slide").groups) == ["s0", "s1", "s0", "s1"]


def test_class_folders_need_two_classes_with_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _img(tmp_path / "ds" / "tumour" / "0.png")
    with pytest.raises(DataError, match="only 'tumour' holds images.*two or more"):
        read_patch_table(tmp_path / "ds")
    (tmp_path / "ds" / "stroma").mkdir()
    with pytest.raises(DataError, match="only 'tumour' holds images"):
        read_patch_table(tmp_path / "ds")
    _img(tmp_path / "ds" / "normal" / "0.png")
    with caplog.at_level("WARNING"):
        t = read_patch_table(tmp_path / "ds")
    assert t.classes == ("normal", "tumour") and t.num_outputs == 2 and "stroma hold no images" in caplog.text


@pytest.mark.parametrize(
    ("rows", "header", "match"),
    [
        ([["p0.png", "a"]], ["file", "label"], "no column 'path'"),
        ([["p0.png", "a"], ["p0.png", "a"]], ["path", "label"], "one class"),
        ([["p0.png", ""]], ["path", "label"], "line 2"),
        ([["missing.png", "a"], ["p0.png", "b"]], ["path", "label"], "missing"),
    ],
)
def test_bad_csv_errors_name_the_problem(tmp_path: Path, rows: list, header: list, match: str) -> None:
    _img(tmp_path / "p0.png")
    with pytest.raises(DataError, match=match):
        read_patch_table(_csv(tmp_path / "x.csv", rows, header))


def test_missing_number_markers_are_not_classes(tmp_path: Path) -> None:
    for i in range(4):
        _img(tmp_path / f"p{i}.png")
    floats = _csv(tmp_path / "f.csv", [["p0.png", 0.5], ["p1.png", 1.7], ["p2.png", "NA"], ["p3.png", 2.2]],
                  ["path", "label"])  # fmt: skip
    with pytest.raises(DataError, match="on line 4 is 'NA', a missing number.*drop the row"):
        read_patch_table(floats)  # was a 4-class classification
    with pytest.raises(DataError, match="on line 4 is 'NA'"):
        read_patch_table(f"regr:{floats}")
    ints = _csv(tmp_path / "i.csv", [["p0.png", 0], ["p1.png", 1], ["p2.png", "null"], ["p3.png", 1]],
                ["path", "label"])  # fmt: skip
    with pytest.raises(DataError, match="'null', a missing number.*class:"):
        read_patch_table(ints)  # was 3 classes: 0, 1, null
    assert read_patch_table(f"class:{ints}").classes == ("0", "1", "null")  # a class may be called null
    names = _csv(tmp_path / "n.csv", [["p0.png", "a"], ["p1.png", "NA"]], ["path", "label"])
    assert read_patch_table(names).classes == ("NA", "a")


def test_short_and_long_rows_name_their_line(tmp_path: Path) -> None:
    for i in range(3):
        _img(tmp_path / f"p{i}.png")
    (tmp_path / "s.csv").write_text("path,label,group\np0.png,a,g0\np1.png,b\np2.png,a,g2\n")
    with pytest.raises(DataError, match="line 3 has no 'group' field"):
        read_patch_table(tmp_path / "s.csv")
    (tmp_path / "l.csv").write_text("path,label\np0.png,a\n\np1.png\n")
    with pytest.raises(DataError, match="line 4 has no 'label' field"):
        read_patch_table(tmp_path / "l.csv")
    (tmp_path / "x.csv").write_text("path,label\np0.png,a\np,1.png,b\n")
    with pytest.raises(DataError, match="line 3 has 3 fields, the header 2"):
        read_patch_table(tmp_path / "x.csv")


def test_class_names_are_kept_as_written(tmp_path: Path) -> None:
    for i in range(8):
        _img(tmp_path / f"p{i}.png")
    names = ["01", "1", "02", "2"]
    t = read_patch_table(_csv(tmp_path / "z.csv", [[f"p{i}.png", names[i % 4]] for i in range(8)], ["path", "label"]))
    assert t.classes == ("01", "1", "02", "2") and list(t.labels) == [0, 1, 2, 3] * 2
    # a whole number written as a float is that integer; integers sort as numbers
    floats = ["1.0", "10", "2.0", "2"]
    t = read_patch_table(_csv(tmp_path / "f.csv", [[f"p{i}.png", floats[i % 4]] for i in range(8)], ["path", "label"]))
    assert t.classes == ("1", "2", "10") and list(t.labels[:4]) == [0, 2, 1, 1]


def test_csv_with_bom_spaced_header_and_tsv(tmp_path: Path) -> None:
    for i in range(2):
        _img(tmp_path / f"p{i}.png")
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,label, group\np0.png,a,g0\np1.png,b,g1\n".encode())
    t = read_patch_table(tmp_path / "bom.csv")
    assert t.classes == ("a", "b") and list(t.groups) == ["g0", "g1"]
    (tmp_path / "t.tsv").write_text("path\tlabel\tgroup\np0.png\ta\tg0\np1.png\tb\tg1\n")
    t = read_patch_table(tmp_path / "t.tsv")
    assert t.classes == ("a", "b") and list(t.groups) == ["g0", "g1"]


def test_bad_regression_label(tmp_path: Path) -> None:
    _img(tmp_path / "p0.png")
    with pytest.raises(DataError, match="not a number"):
        read_patch_table(f"regr:{_csv(tmp_path / 'x.csv', [['p0.png', 'high']], ['path', 'label'])}")
    with pytest.raises(DataError, match="group column 'slide'"):
        read_patch_table(f"{_csv(tmp_path / 'y.csv', [['p0.png', 'a']], ['path', 'label'])}?group=slide")


# ----------------------------------------------------------------------------- pixels


def test_load_patch_sizes_and_mpp(tmp_path: Path) -> None:
    p = _img(tmp_path / "a.png", (40, 30))
    a = load_patch(p, 16)  # shorter side 30 -> 16, then centre crop
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8 and a.flags.writeable
    # at scale 1 (same um/px) a 40x30 image is centre-cropped, pixels unchanged
    b = load_patch(p, 20, scale=1.0)
    assert np.array_equal(b, np.asarray(Image.open(p).convert("RGB"))[5:25, 10:30])
    # 0.25 um/px patches for a 0.5 um/px encoder: halved, then padded by reflection
    c = load_patch(p, 24, scale=0.5)
    assert c.shape == (24, 24, 3)
    ds = PatchDataset(
        read_patch_table(_csv(tmp_path / "r.csv", [["a.png", 0.5], ["a.png", 1.5]], ["path", "label"])), 8
    )
    image, label = ds[1]
    assert tuple(image.shape) == (3, 8, 8) and str(image.dtype) == "torch.uint8" and float(label) == 1.5
    assert ds.read_all().shape == (2, 8, 8, 3)


def test_dataset_mpp_sets_scale(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", (64, 64))
    t = read_patch_table(
        f"regr:{_csv(tmp_path / 'r.csv', [['a.png', 0.5], ['a.png', 0.7]], ['path', 'label'])}?mpp=0.25"
    )
    assert PatchDataset(t, 32, mpp=0.5).scale == 0.5
    assert PatchDataset(t, 32, mpp=None).scale is None


# ----------------------------------------------------------------------------- splits


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.integers(0, 12), min_size=2, max_size=80),
    fraction=st.floats(0.1, 0.9),
    seed=st.integers(0, 10),
)
def test_group_split_never_shares_a_group(groups: list[int], fraction: float, seed: int) -> None:
    g = np.asarray([f"g{v}" for v in groups], dtype=object)
    if len(set(groups)) < 2:
        with pytest.raises(DataError):
            group_split(len(g), fraction, g, seed=seed)
        return
    tr, te = group_split(len(g), fraction, g, seed=seed)
    assert len(tr) and len(te)
    assert sorted(np.concatenate([tr, te])) == list(range(len(g)))
    assert not set(g[tr]) & set(g[te])


def test_group_split_lc25000_is_stratified_and_disjoint(lc25000: Path) -> None:
    t = read_patch_table(lc25000 / "labels.csv")
    tr, te = group_split(len(t), 0.25, t.groups, t.labels, seed=0)
    assert not set(t.groups[tr]) & set(t.groups[te])
    # 150 groups per class, 38 of them held out per class
    per_class = [len(np.unique(t.groups[te][t.labels[te] == c])) for c in range(3)]
    assert per_class == [38, 38, 38]
    a, b = group_split(len(t), 0.25, t.groups, t.labels, seed=0)
    assert np.array_equal(a, tr) and np.array_equal(b, te)


def test_group_split_without_groups_is_by_sample() -> None:
    tr, te = group_split(10, 0.3, None, seed=1)
    assert len(te) == 3 and len(tr) == 7


# ----------------------------------------------------------------------------- nuclei


def test_polygon_centroid_and_window_counts() -> None:
    square = np.array([[0, 0], [4, 0], [4, 2], [0, 2]], float)
    np.testing.assert_allclose(polygon_centroid(square), [2, 1])
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 100, (200, 2))
    x0, y0 = np.array([0, 10, 50, 90]), np.array([0, 20, 50, 0])
    brute = [sum(1 for x, y in pts if a <= x < a + 25 and b <= y < b + 25) for a, b in zip(x0, y0)]
    assert list(count_in_windows(pts, x0, y0, 25)) == brute


def test_xml_counts_match_the_labels_table(monuseg: Path) -> None:
    rows = list(csv.DictReader(open(monuseg / "labels.csv")))
    assert len(rows) == 13
    for r in rows:
        xml = monuseg / "annotations_xml_gz" / f"{r['tcga_barcode']}.xml.gz"
        polygons, mpp = read_nuclei_xml(xml)
        assert len(polygons) == int(r["n_nuclei_in_xml"]), r["tcga_barcode"]
        centroids = np.asarray([polygon_centroid(p) for p in polygons])
        # a 4 x 4 tiling of the 1000 x 1000 image holds every centroid exactly once
        gx, gy = np.meshgrid(np.arange(4) * 250, np.arange(4) * 250)
        assert count_in_windows(centroids, gx.ravel(), gy.ravel(), 250).sum() == int(r["n_nuclei_in_xml"])
        if r["tcga_barcode"] == "TCGA-21-5784-01Z-00-DX1":
            assert mpp == pytest.approx(0.2527)


def test_mask_components_and_instances(tmp_path: Path, monuseg: Path) -> None:
    m = np.zeros((20, 30), np.uint8)
    m[2:5, 2:5] = 1  # centre (3, 3)
    m[10:12, 20:26] = 1  # centre (x 22.5, y 10.5)
    m[15, 5] = 1
    Image.fromarray(m * 255).save(tmp_path / "bin.png")
    c = read_nuclei_mask(tmp_path / "bin.png")
    np.testing.assert_allclose(sorted(map(tuple, c)), sorted([(3.0, 3.0), (22.5, 10.5), (5.0, 15.0)]))
    inst = np.zeros((20, 30), np.uint16)
    inst[2:5, 2:5] = 7
    inst[2:5, 5:8] = 9  # touching but a separate instance
    inst[10, 10] = 3
    Image.fromarray(inst).save(tmp_path / "inst.png")
    assert len(read_nuclei_mask(tmp_path / "inst.png")) == 3
    # the real binary masks: touching nuclei merge, so never more components than polygons
    xml = read_nuclei(monuseg / "annotations_xml_gz" / "TCGA-21-5784-01Z-00-DX1.xml.gz")
    mask = read_nuclei(monuseg / "binary_masks" / "TCGA-21-5784-01Z-00-DX1.png")
    assert 0.5 * len(xml) < len(mask) <= len(xml) and mask.mpp is None


def test_colour_instance_mask_keeps_each_colour(tmp_path: Path) -> None:
    m = np.zeros((20, 40, 3), np.uint8)
    m[2:6, 2:6] = (200, 10, 10)
    m[2:6, 6:10] = (200, 20, 10)  # touching, the same red: another nucleus all the same
    m[10:14, 20:24] = (5, 5, 150)
    Image.fromarray(m).save(tmp_path / "rgb.png")
    c = read_nuclei_mask(tmp_path / "rgb.png")
    np.testing.assert_allclose(sorted(map(tuple, c)), [(3.5, 3.5), (7.5, 3.5), (21.5, 11.5)])
    # coloured by nucleus type (PanNuke/MoNuSAC overlays): separate blobs of one colour are nuclei each
    t = np.zeros((20, 40, 3), np.uint8)
    for x in (2, 10, 18, 26):
        t[2:6, x : x + 4] = (255, 0, 0)
    for x in (2, 10, 18):
        t[12:16, x : x + 4] = (0, 255, 0)
    Image.fromarray(t).save(tmp_path / "types.png")
    assert len(read_nuclei_mask(tmp_path / "types.png")) == 7


def test_annotations_must_match_their_image(tmp_path: Path, monuseg: Path) -> None:
    stem = "TCGA-21-5784-01Z-00-DX1"
    for d in ("img", "half", "mask", "xml"):
        (tmp_path / d).mkdir()
    shutil.copy(monuseg / "images" / f"{stem}.tif", tmp_path / "img")
    with Image.open(monuseg / "images" / f"{stem}.tif") as im:
        im.convert("RGB").resize((500, 500), Image.BOX).save(tmp_path / "half" / f"{stem}.tif")
    with Image.open(monuseg / "binary_masks" / f"{stem}.png") as im:
        im.resize((500, 500), Image.NEAREST).save(tmp_path / "mask" / f"{stem}.png")
    with pytest.raises(DataError, match="the mask is 500x500 px, its image .* 1000x1000 px"):
        nuclei_patch_dataset(pair_images_annotations(tmp_path / "img", tmp_path / "mask"), tmp_path / "o1",
                             patch_size=125, fallback_mpp=0.2527)  # fmt: skip
    # the XML's coordinates are at its 0.2527 um/px: on the image halved they must be halved too
    shutil.copy(monuseg / "annotations_xml_gz" / f"{stem}.xml.gz", tmp_path / "xml")
    full = nuclei_patch_dataset(pair_images_annotations(tmp_path / "img", tmp_path / "xml"), tmp_path / "o2",
                                patch_size=125, mpp=0.5, target="count")  # fmt: skip
    half = nuclei_patch_dataset(pair_images_annotations(tmp_path / "half", tmp_path / "xml"), tmp_path / "o3",
                                patch_size=125, mpp=0.5, source_mpp=0.5054, target="count")  # fmt: skip
    counts = [[int(r["count"]) for r in csv.DictReader(open(f))] for f in (full, half)]
    assert counts[0] == counts[1] and sum(counts[0]) > 350
    with pytest.raises(DataError, match="nuclei lie outside its 500x500 px image"):  # the image's um/px not given
        nuclei_patch_dataset(pair_images_annotations(tmp_path / "half", tmp_path / "xml"), tmp_path / "o4",
                             patch_size=60, mpp=0.5)  # fmt: skip


def test_bad_annotation_files(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text("<Annotations><Annotation/></Annotations>")
    with pytest.raises(DataError, match="no <Region>"):
        read_nuclei_xml(tmp_path / "a.xml")
    (tmp_path / "b.xml").write_text("<not xml")
    with pytest.raises(DataError, match="not a readable"):
        read_nuclei(tmp_path / "b.xml")
    with pytest.raises(DataError, match="unknown annotation"):
        read_nuclei(tmp_path / "c.json")


def test_nuclei_patch_dataset_from_monuseg(tmp_path: Path, monuseg: Path) -> None:
    stem = "TCGA-21-5784-01Z-00-DX1"
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    shutil.copy(monuseg / "images" / f"{stem}.tif", tmp_path / "img")
    shutil.copy(monuseg / "annotations_xml_gz" / f"{stem}.xml.gz", tmp_path / "ann")
    pairs = pair_images_annotations(tmp_path / "img", tmp_path / "ann")
    # 125 px at 0.5 um/px = 247 px at 0.2527 um/px: a 4 x 4 tiling of 1000 px (the last 12 px left out)
    out = nuclei_patch_dataset(pairs, tmp_path / "out", patch_size=125, mpp=0.5, target="density")
    t = read_patch_table(f"regr:{out}")
    assert len(t) == 16 and set(t.groups) == {stem}
    rows = list(csv.DictReader(open(out)))
    counts = np.array([int(r["count"]) for r in rows])
    area_mm2 = (125 * 0.5 / 1000) ** 2
    np.testing.assert_allclose(t.labels, counts / area_mm2, rtol=1e-5)
    ann = read_nuclei(monuseg / "annotations_xml_gz" / f"{stem}.xml.gz")
    win = 125 * 0.5 / 0.2527
    gx, gy = np.meshgrid(np.arange(4) * win, np.arange(4) * win)
    assert sorted(counts) == sorted(count_in_windows(ann.centroids, gx.ravel(), gy.ravel(), win))
    assert Image.open(t.paths[0]).size == (125, 125)
    with pytest.raises(DataError, match="no annotation"):
        (tmp_path / "img" / "extra.tif").write_bytes(b"")
        pair_images_annotations(tmp_path / "img", tmp_path / "ann")


# ----------------------------------------------------------------------------- multitask


def test_multitask_dataset_and_sampling(tmp_path: Path) -> None:
    import torch

    for i in range(6):
        _img(tmp_path / f"p{i}.png", (8, 8), value=10 * i)
    a = PatchDataset(
        read_patch_table(_csv(tmp_path / "a.csv", [[f"p{i}.png", "xy"[i % 2]] for i in range(6)], ["path", "label"])), 8
    )
    b = PatchDataset(
        read_patch_table(f"regr:{_csv(tmp_path / 'b.csv', [['p0.png', 2.5], ['p1.png', 3.5]], ['path', 'label'])}"), 8
    )
    ds = MultitaskDataset([a, b])
    assert len(ds) == 8 and list(ds.sizes) == [6, 2]
    image, target, task = ds[7]
    assert int(task) == 1 and float(target) == 3.5 and tuple(image.shape) == (3, 8, 8)
    assert int(ds[0][2]) == 0
    np.testing.assert_allclose(task_weights([6, 2], "balanced"), [1 / 6] * 6 + [1 / 2] * 2)
    drawn = torch.as_tensor(list(multitask_sampler([6, 2], "balanced", num_samples=4000, seed=0)))
    share = float((drawn >= 6).float().mean())
    assert abs(share - 0.5) < 0.05
    assert sorted(multitask_sampler([6, 2], "proportional", seed=0)) == list(range(8))
    with pytest.raises(DataError):
        task_weights([1], "sometimes")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="patch sizes"):
        MultitaskDataset([a, PatchDataset(a.table, 16)])
