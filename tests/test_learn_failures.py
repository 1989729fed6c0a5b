"""Slide-level training and loading never turn a broken number or file into a quiet result."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import nic.learn.train as train_mod
from nic.errors import DataError
from nic.learn import FitConfig, LabelSpec, SlideModel, fit_model, load_cohort
from nic.learn.data import Cohort, SlideSource, open_sources
from nic.synth import PlantedCohort, make_planted_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> PlantedCohort:
    """12 patients, 8 x 8 grids, 4 channels; read-only."""
    return make_planted_cohort(
        tmp_path_factory.mktemp("small"), 12, grid=(8, 8), code_size=4, slides_per_patient=(1, 2), n_pairs=2, seed=3
    )


def _cohort(small: PlantedCohort) -> tuple[Cohort, list[SlideSource]]:
    co = load_cohort(small.stores, LabelSpec(small.labels, "regression", target="proliferation"))
    return co, open_sources(co.store_paths)


class _Poison:
    """``task_loss`` that returns a non-finite loss for chosen (epoch, training) calls."""

    def __init__(self, poison: Any) -> None:
        self.poison, self.epoch, self.real = poison, 0, train_mod.task_loss

    def __call__(self, task: str, out: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
        loss = self.real(task, out, *a, **kw)
        training = out.requires_grad
        value = self.poison(self.epoch, training)
        if not training:
            self.epoch += 1  # validation closes an epoch
        return loss * value if value is not None else loss


def _weights_finite(m: SlideModel) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in m.net.state_dict().values() if v.is_floating_point())


def test_non_finite_validation_loss_is_never_the_best_epoch(
    small: PlantedCohort, monkeypatch: pytest.MonkeyPatch
) -> None:
    co, src = _cohort(small)
    # epoch 2's validation loss is -inf: "smaller" than any real loss, yet no result
    monkeypatch.setattr(train_mod, "task_loss", _Poison(lambda ep, tr: -math.inf if ep == 2 and not tr else None))
    cfg = FitConfig(epochs=4, width=8, batch_size=4, ratio_average=False)  # each epoch's own weights kept or not
    _, hist = fit_model(co, src, np.arange(8), np.arange(8, 12), cfg, seed=0)
    assert hist.val_loss[2] == -math.inf  # recorded as it came
    assert hist.best_epoch != 2 and math.isfinite(hist.val_loss[hist.best_epoch])
    assert hist.val_loss[hist.best_epoch] == min(v for v in hist.val_loss if math.isfinite(v))


def test_averaged_ratio_copies_with_a_non_finite_validation_loss_fall_back_to_the_best_copy(
    small: PlantedCohort, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    co, src = _cohort(small)
    # 3 starts x 2 epochs of the ratio stage validate 6 times; the 7th validation is the average's
    monkeypatch.setattr(train_mod, "task_loss", _Poison(lambda ep, tr: math.nan if ep == 6 and not tr else None))
    with caplog.at_level("WARNING", logger="nic.learn.train"):
        m, hist = fit_model(co, src, np.arange(8), np.arange(8, 12), FitConfig(epochs=2, width=8, batch_size=4), seed=0)
    assert hist.stage[:6] == ["ratio", "ratio", "ratio.2", "ratio.2", "ratio.3", "ratio.3"]
    assert "keeping its best copy alone" in caplog.text
    weights = m.net.ratio_weights.tolist()
    assert sorted(weights) == [0.0, 0.0, 1.0]
    best_start = int(np.argmin([min(hist.val_loss[2 * k : 2 * k + 2]) for k in range(3)]))
    assert weights[best_start] == 1.0 and _weights_finite(m)


def test_non_finite_training_batches_do_not_step(
    small: PlantedCohort, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    co, src = _cohort(small)
    calls = {"n": 0}

    def every_other_batch(ep: int, tr: bool) -> float | None:
        if not tr:
            return None
        calls["n"] += 1
        return math.nan if calls["n"] % 2 else None

    monkeypatch.setattr(train_mod, "task_loss", _Poison(every_other_batch))
    with caplog.at_level("WARNING", logger="nic.learn.train"):
        m, hist = fit_model(co, src, np.arange(8), np.arange(8, 12), FitConfig(epochs=2, width=8, batch_size=4), seed=0)
    assert _weights_finite(m)  # a NaN step would have made every weight NaN
    assert all(math.isnan(v) for v in hist.train_loss)  # the epoch mean says a batch was bad
    assert all(math.isfinite(v) for v in hist.val_loss) and hist.best_epoch >= 0
    assert "epoch 0: 2 of 3 training batches had a non-finite loss" in caplog.text  # batches 1 and 3 of 3


@pytest.mark.parametrize("with_validation", [True, False])
def test_every_epoch_failing_is_an_error(
    small: PlantedCohort, monkeypatch: pytest.MonkeyPatch, with_validation: bool
) -> None:
    co, src = _cohort(small)
    monkeypatch.setattr(train_mod, "task_loss", _Poison(lambda ep, tr: math.inf if tr else None))
    val = np.arange(8, 12) if with_validation else np.arange(0)
    with pytest.raises(DataError, match=r"training loss was not finite .* lower `lr`") as e:
        fit_model(co, src, np.arange(8), val, FitConfig(epochs=2, width=8, batch_size=4), seed=0)
    assert "\n" not in str(e.value)


def test_validation_never_finite_is_an_error(small: PlantedCohort, monkeypatch: pytest.MonkeyPatch) -> None:
    co, src = _cohort(small)
    monkeypatch.setattr(train_mod, "task_loss", _Poison(lambda ep, tr: None if tr else math.nan))
    cfg = FitConfig(epochs=2, width=8, batch_size=4, ratio_starts=2)  # the first stage's 2 starts x 2 epochs
    with pytest.raises(DataError, match=r"validation loss was not finite in any of the 4 epochs.*lower `lr`"):
        fit_model(co, src, np.arange(8), np.arange(8, 12), cfg, seed=0)


def _saved(folder: Path) -> Path:
    from nic.learn import ModelSpec, create_model

    torch.manual_seed(0)
    spec = ModelSpec(4, 1, width=8, input_size=8)
    SlideModel("nic-cnn", spec, "regression", 8, create_model("nic-cnn", spec)).save(folder)
    return folder


def test_empty_weight_file_is_a_one_line_error(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "fold_0")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(DataError) as e:
        SlideModel.load(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and "model.safetensors" in msg and "nic train" in msg


def test_weights_of_another_architecture_are_a_one_line_error(tmp_path: Path) -> None:
    import json

    folder = _saved(tmp_path / "fold_0")
    meta = json.loads((folder / "model.json").read_text())
    meta["spec"]["width"] = 16  # model.json and the weights disagree
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"do not fit the 'nic-cnn' model .* of another shape") as e:
        SlideModel.load(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value) and "nic train" in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("width", 0, "`width` must be an integer of at least 2 (got 0)"),  # meanpool: a constant prediction
        ("width", 1, "`width` must be an integer of at least 2 (got 1)"),  # abmil: attention of width 0
        ("patience", 0, "`patience` must be an integer of at least 1 (got 0)"),  # stops after epoch 1
        ("lr_patience", -1, "`lr_patience` must be an integer of at least 0 (got -1)"),
        ("tta_crops", 0, "`tta_crops` must be an integer of at least 1 (got 0)"),
        ("val_crops", 0, "`val_crops` must be an integer of at least 1 (got 0)"),
        ("seed", -1, "`seed` must be an integer of at least 0 (got -1)"),
        ("weight_decay", -1e-3, "`weight_decay` must be a number of at least 0 (got -0.001)"),
        ("min_lr", -1.0, "`min_lr` must be a number of at least 0 (got -1.0)"),
        ("val_fraction", 0.8, "`val_fraction` must be a number in [0, 0.5] (got 0.8)"),
    ],
)
def test_fit_config_refuses_hyper_parameters_that_make_nonsense(field: str, value: Any, want: str) -> None:
    from nic.errors import OptionError

    with pytest.raises(OptionError) as info:
        FitConfig(**{field: value})
    assert str(info.value) == want


def test_train_width_0_is_one_error_line_before_any_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from nic.cli import app

    args = ["train", "--compressed", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "--task", "regression",
            "--target", "y", "--model", "meanpool", "--width", "0", "--out", str(tmp_path / "run")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and res.output == "error: --width must be an integer of at least 2 (got 0)\n"
    assert not (tmp_path / "run").exists()
