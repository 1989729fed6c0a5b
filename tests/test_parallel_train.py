"""``nic train --devices``: folds fitted in parallel worker processes give the sequential run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from nic.errors import DataError, OptionError
from nic.learn import CVConfig, FitConfig, LabelSpec, train_cv
from nic.synth import PlantedCohort, make_planted_cohort


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> PlantedCohort:
    """12 patients, 8 x 8 grids, 4 channels; read-only."""
    return make_planted_cohort(
        tmp_path_factory.mktemp("small"), 12, grid=(8, 8), code_size=4, slides_per_patient=(1, 2), n_pairs=2, seed=3
    )


def _config(small: PlantedCohort, out: Path | None, **kw) -> CVConfig:  # type: ignore[no-untyped-def]
    spec = LabelSpec(small.labels, "regression", target="proliferation")
    fit = FitConfig(epochs=2, width=8, batch_size=4, seed=5, device="cpu")
    return CVConfig(small.stores, spec, fit, folds=3, out=out, threads=1, n_bootstrap=50, **kw)


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow  # two spawned workers import torch: ~40 s on 2 cores
def test_parallel_folds_equal_the_sequential_run(small: PlantedCohort, tmp_path: Path) -> None:
    seq = train_cv(_config(small, tmp_path / "seq"))
    par = train_cv(_config(small, tmp_path / "par", devices=("cpu", "cpu")))
    pd.testing.assert_frame_equal(seq.predictions, par.predictions, check_exact=True)
    assert json.dumps(seq.metrics) == json.dumps(par.metrics)
    for a, b in zip(seq.models, par.models):
        sa, sb = a.net.state_dict(), b.net.state_dict()
        assert sa.keys() == sb.keys() and all(np.array_equal(sa[k].cpu(), sb[k]) for k in sa)
    assert [h.train_loss for h in seq.histories] == [h.train_loss for h in par.histories]
    # the run folders hold the same bytes, but for the settings (config.json) and the timings (folds.json)
    fs, fp = _files(tmp_path / "seq"), _files(tmp_path / "par")
    assert fs.keys() == fp.keys()
    assert [k for k in fs if fs[k] != fp[k]] == ["config.json", "folds.json"]
    assert json.loads(fp["config.json"].decode())["devices"] == ["cpu", "cpu"]


@pytest.mark.slow
def test_a_failing_fold_stops_the_run_and_leaves_no_folder(small: PlantedCohort, tmp_path: Path) -> None:
    # a learning rate so large that no epoch's loss is finite: fit_model's DataError, in a worker
    import dataclasses
    import multiprocessing

    cfg = _config(small, tmp_path / "run", devices=("cpu", "cpu"))
    cfg = dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, lr=1e30))
    with pytest.raises(DataError, match="not finite in any of the"):
        train_cv(cfg)
    assert not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == []
    assert multiprocessing.active_children() == []  # no worker is left running


def test_devices_are_read_and_checked(small: PlantedCohort, tmp_path: Path) -> None:
    import torch

    assert _config(small, None, devices="0, 1").devices == ("cuda:0", "cuda:1")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="empty entry"):
        _config(small, None, devices="cpu,,cpu")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="not a torch device"):
        train_cv(_config(small, tmp_path / "run", devices=("gpu7",)))
    if not torch.cuda.is_available():
        from nic.cli import app

        args = ["train", "--compressed", str(small.stores), "--labels", str(small.labels), "--task", "regression",
                "--target", "proliferation", "--out", str(tmp_path / "run"), "--devices", "0,1"]  # fmt: skip
        res = CliRunner().invoke(app, args)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert "--devices" in lines[0] and "no CUDA device" in lines[0]
    assert not (tmp_path / "run").exists()
