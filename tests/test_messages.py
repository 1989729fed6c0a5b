"""Error messages that give the right advice: what is known, and a fix that exists."""

from __future__ import annotations

import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import nic
from nic.cli import app
from nic.errors import EncoderError, MppError, SlideError


def _cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line(res) -> str:
    lines = [x for x in res.output.splitlines() if x]
    assert len(lines) == 1, res.output
    return lines[0]


# -- pickled checkpoints ----------------------------------------------------------------------------


def test_pickle_refusal_gives_a_conversion_that_works(tmp_path, wsi_dir: Path):
    """The refusal names no --unsafe option (compress, probe and train-encoder have none);
    its python -c line converts the checkpoint, and the result loads."""
    torch.manual_seed(0)
    enc = nic.create_encoder("nic-cnn", width=8, code_size=16)
    ckpt = tmp_path / "enc.pth"
    torch.save(enc.module.state_dict(), ckpt)
    spec = f"nic-cnn?width=8&code_size=16&weights={ckpt}"
    with pytest.raises(EncoderError) as info:
        nic.load_encoder(spec)
    msg = str(info.value)
    assert "--unsafe" not in msg and "unsafe=True" in msg
    res = _cli("compress", wsi_dir / "CMU-1-Small-Region.svs", "--encoder", spec, "--out", tmp_path / "out")
    assert res.exit_code == 2 and _one_line(res) == f"error: {msg}"
    command = msg.split("(python -c ", 1)[1].split(") and give that file", 1)[0]
    subprocess.run([sys.executable, "-c", shlex.split(command)[0]], check=True, cwd=tmp_path)
    converted = nic.load_encoder(f"nic-cnn?width=8&code_size=16&weights={tmp_path / 'enc.safetensors'}")
    x = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    np.testing.assert_allclose(converted.embed(x), enc.embed(x), rtol=1e-5, atol=1e-6)


# -- --mpp --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mpp", ["1e-06", "500"])
def test_an_absurd_mpp_is_refused_before_any_slide(shared, tmp_path, mpp, wsi_dir: Path):
    svs = wsi_dir / "CMU-1-Small-Region.svs"
    res = _cli("compress", svs, "--encoder", tmp_path / "no-encoder-needed", "--out", tmp_path / "out", "--mpp", mpp)
    assert res.exit_code == 2
    want = f"error: --mpp {float(mpp):g} is outside 0.05-100 um/px, the level-0 pixel sizes of slide scans"
    assert _one_line(res).startswith(want)
    assert not (tmp_path / "out").exists()
    res = _cli("info", svs, "--mpp", mpp)
    assert res.exit_code == 2 and _one_line(res).startswith(f"error: {svs}: --mpp {float(mpp):g} is outside")
    with pytest.raises(MppError, match="outside 0.05-100 um/px"):
        nic.open_slide(svs, mpp=float(mpp))
    with nic.open_slide(svs, mpp=0.05) as s:  # the range's ends are allowed
        assert s.mpp == (0.05, 0.05)


# -- DICOM: not conformant is not truncated -----------------------------------------------------------


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def _dicom(path: Path, sop_class: bytes) -> Path:
    """A small, well-formed DICOM file (explicit VR little endian) of ``sop_class`` with no image."""
    meta = (
        _element(2, 1, b"OB", b"\0\1") + _element(2, 2, b"UI", sop_class) + _element(2, 3, b"UI", b"1.2.3.4")
        + _element(2, 0x10, b"UI", b"1.2.840.10008.1.2.1")
    )  # fmt: skip
    body = (
        _element(8, 0x16, b"UI", sop_class)
        + _element(8, 0x18, b"UI", b"1.2.3.4")
        + _element(0x10, 0x10, b"PN", b"Test^P")
    )
    path.write_bytes(b"\0" * 128 + b"DICM" + _element(2, 0, b"UL", struct.pack("<I", len(meta))) + meta + body)
    return path


def test_a_dicom_that_is_not_a_slide_is_not_called_truncated(tmp_path):
    sc = _dicom(tmp_path / "photo.dcm", b"1.2.840.10008.5.1.4.1.1.7")  # secondary capture
    with pytest.raises(SlideError) as info:
        nic.open_slide(sc)
    assert str(info.value).startswith(f"{sc}: a DICOM file, but not a whole-slide image")
    assert "truncated" not in str(info.value)


def test_a_non_conformant_dicom_wsi_is_not_called_truncated(tmp_path):
    wsi = _dicom(tmp_path / "wsi.dcm", b"1.2.840.10008.5.1.4.1.1.77.1.6")  # WSI class, no image attributes
    with pytest.raises(SlideError) as info:
        nic.open_slide(wsi)
    msg = str(info.value)
    assert "could not find data element" in msg  # the reader's own reason
    assert "not a DICOM whole-slide image OpenSlide supports" in msg and "truncated" not in msg


@pytest.mark.parametrize("keep", [500, 60_000])
def test_a_truncated_dicom_is_called_truncated(shared, tmp_path, keep, wsi_dir: Path):
    cut = tmp_path / "cut.dcm"
    cut.write_bytes((wsi_dir / "camelyon_lowres_wsi.dcm").read_bytes()[:keep])
    with pytest.raises(
        SlideError, match=r"cut\.dcm: .*the file ends before its data \(.*end of filehandle.*\); it is truncated"
    ):
        with nic.open_slide(cut) as s:  # 500 bytes: the header is cut; 60 kB: the frames are
            s.read_region((0, 0), s.dimensions)


def test_running_out_of_memory_is_not_called_a_damaged_file(shared, monkeypatch, wsi_dir: Path):
    with nic.open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:

        def no_memory(*args):
            raise MemoryError(
                "Unable to allocate 175. TiB for an array with shape (8000000, 8000000, 3) and data type uint8"
            )

        monkeypatch.setattr(s._reader, "read", no_memory)
        with pytest.raises(SlideError) as info:
            s.read_region((0, 0), (64, 64))
    msg = str(info.value)
    assert "out of memory (Unable to allocate" in msg and "check `mpp`" in msg
    assert "truncated" not in msg and "damaged" not in msg
