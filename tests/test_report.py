"""The run report: survival and calibration numbers against second references, the HTML."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from nic.learn import CVConfig, FitConfig, LabelSpec, train_cv
from nic.learn.metrics import survival_analysis
from nic.metrics import expected_calibration_error
from nic.synth import make_planted_cohort


def _survival_data(n: int = 150, censor: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    t = rng.exponential(np.exp(-risk))
    if not censor:
        return t, np.ones(n, int), risk
    c = rng.uniform(0, 2.5, n)
    return np.minimum(t, c), (t < c).astype(int), risk


def test_kaplan_meier_and_logrank_agree_with_scikit_survival() -> None:
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    t, e, r = _survival_data()
    a = survival_analysis(t, e, r)
    for g, (times, surv) in enumerate(a.km):
        sel = a.groups == g
        kt, ks = kaplan_meier_estimator(e[sel].astype(bool), t[sel])
        # lifelines starts its curve at time 0 with 1.0; compare at scikit-survival's event times
        np.testing.assert_allclose(np.interp(kt, times, surv, left=1.0), ks, atol=1e-12)
    _, p = compare_survival(Surv.from_arrays(e.astype(bool), t), a.groups)
    assert a.logrank_p == pytest.approx(p, rel=1e-9)
    assert a.logrank_p < 1e-3  # the risk is the true log-hazard


def test_time_dependent_auc_and_brier_without_censoring_by_hand() -> None:
    t, e, r = _survival_data(censor=False, seed=1)
    a = survival_analysis(t, e, r)
    for when, auc in zip(a.times, a.td_auc):
        cases, controls = r[t <= when], r[t > when]
        by_hand = np.mean(cases[:, None] > controls[None, :]) + 0.5 * np.mean(cases[:, None] == controls[None, :])
        assert auc == pytest.approx(by_hand, abs=1e-9)
    # the Kaplan-Meier reference without censoring is the empirical survival curve:
    # Brier(t) = mean((1{T > t} - S(t))^2) = S(t)(1 - S(t)); integrated (trapezoid) / range
    lo, hi = np.quantile(t, [0.1, 0.9])
    grid = np.unique(np.linspace(lo, hi, 50))
    s = np.array([(t > g).mean() for g in grid])
    brier = s * (1 - s)
    by_hand = np.trapezoid(brier, grid) / (grid[-1] - grid[0])
    assert a.ibs_km == pytest.approx(by_hand, rel=1e-6)
    assert a.ibs < a.ibs_km  # the true log-hazard beats the population curve


def test_expected_calibration_error_known_answers() -> None:
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    p = np.array([0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1])
    # bin 0.9: observed 3/4 -> |0.75 - 0.9|; bin 0.1: observed 1/4 -> |0.25 - 0.1|; each half the patients
    assert expected_calibration_error(y, p) == pytest.approx(0.15)
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    # top-label: conf 0.8 hit, 0.6 miss, 0.7 hit -> bins 8, 6, 7: (0.2 + 0.6 + 0.3) / 3
    assert expected_calibration_error(np.array([0, 1, 1]), probs) == pytest.approx((0.2 + 0.6 + 0.3) / 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    c = make_planted_cohort(tmp_path_factory.mktemp("rep"), 30, grid=(12, 12), n_pairs=2, seed=4)
    out = {}
    specs = {
        "regression": LabelSpec(c.labels, "regression", target="proliferation"),
        "binary": LabelSpec(c.labels, "binary", target="growth_pattern"),
        "survival": LabelSpec(c.labels, "survival", time="survival_time", event="survival_event"),
    }
    for task, spec in specs.items():
        out[task] = tmp_path_factory.mktemp("rep") / task
        fit = FitConfig(model="meanpool", epochs=3, width=8, batch_size=4)
        if task == "regression":  # nic-cnn with its cell-ratio branch: training in stages
            fit = FitConfig(epochs=3, width=8, batch_size=4, ratio_starts=2)
        train_cv(CVConfig(c.stores, spec, fit, folds=2, out=out[task], n_bootstrap=50))
    torch.set_num_threads(before)
    return out


@pytest.mark.parametrize(
    ("task", "sections"),
    [
        ("regression", ["Regression", "Spearman", "Epochs of each stage", "ratio 0-2, ratio.2 3-5, conv 6-8"]),
        ("binary", ["Classification", "ROC", "reliability", "ECE"]),
        ("survival", ["Survival", "Kaplan-Meier", "log-rank", "time-dependent AUC", "Integrated Brier score"]),
    ],
)
def test_report_has_every_section(runs: dict[str, Path], tmp_path: Path, task: str, sections: list[str]) -> None:
    from nic.explain import write_report

    path = write_report(runs[task], tmp_path / "r.html")
    text = path.read_text()
    for s in ["<h2>Data</h2>", "<h2>Metrics</h2>", "Per-patient uncertainty", "<h2>Heatmaps</h2>", "<h2>Config</h2>",
              "<h2>Versions</h2>", "<svg", *sections]:  # fmt: skip
        assert s in text, s
    # self-contained: nothing fetched from elsewhere, no script
    assert re.search(r"(src|href)=[\"']?(https?:|//|file:)", text) is None and "<script" not in text


def test_report_reads_ids_and_classes_as_written(tmp_path: Path) -> None:
    """Patient ids that look like numbers ("0007") and classes that sort one way as text and
    another as numbers ("10" > "2"): the curves are drawn for the run's positive class, the
    same AUC as metrics.json, and the gallery finds its patients."""
    import json

    import pandas as pd

    from nic.explain import write_report

    c = make_planted_cohort(tmp_path, 20, grid=(12, 12), n_pairs=2, seed=5)
    df = pd.read_csv(c.labels, dtype=str)
    df["patient"] = df["patient"].str[1:]
    df["grade"] = np.where(df["growth_pattern"] == "1", "10", "2")
    df.to_csv(tmp_path / "labels.csv", index=False)
    run = tmp_path / "run"
    spec = LabelSpec(tmp_path / "labels.csv", "binary", target="grade")
    fit = FitConfig(model="meanpool", epochs=2, width=8, batch_size=4)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_cv(CVConfig(c.stores, spec, fit, folds=2, out=run, n_bootstrap=20))
    finally:
        torch.set_num_threads(before)
    text = write_report(run, tmp_path / "r.html", gallery=1).read_text()
    value = json.loads((run / "metrics.json").read_text())["auc"]["value"]
    assert "Positive class: 10." in text and f"AUC {value:.3f}" in text
    assert len(re.findall(r"confident: patient \d{4}, slide s\d{4}_\d", text)) == 2, "gallery pictures"


def test_survival_report_of_a_cohort_too_small_to_analyse(tmp_path: Path) -> None:
    """Four patients with two distinct risks: the report is written and says why its survival
    analysis is missing, instead of failing inside lifelines."""
    from nic.explain import write_report

    c = make_planted_cohort(tmp_path, 4, grid=(12, 12), n_pairs=2, seed=3)
    spec = LabelSpec(c.labels, "survival", time="survival_time", event="survival_event")
    fit = FitConfig(model="meanpool", epochs=2, width=8, batch_size=4)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_cv(CVConfig(c.stores, spec, fit, folds=2, out=tmp_path / "run", n_bootstrap=20))
    finally:
        torch.set_num_threads(before)
    text = write_report(tmp_path / "run", tmp_path / "r.html", gallery=0).read_text()
    assert "could not be computed for these 4 patients" in text and "<h2>Config</h2>" in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_demo_report_renders_in_chromium(tmp_path: Path) -> None:
    """A small demo's survival report, rendered headless: the DOM has every section with
    content and the screenshot is not blank."""
    from PIL import Image

    from nic.demo import DemoConfig, run_demo

    cfg = DemoConfig(slides=12, size=4096, seed=5, patches_per_class=16, encoder_epochs=1, slide_epochs=4, folds=2)
    run_demo(tmp_path / "demo", cfg, say=lambda s: None)
    report = tmp_path / "demo" / "reports" / "survival.html"
    args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run([*args, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    for s in ["Metrics", "Survival", "Kaplan-Meier", "Heatmaps", "Per-patient uncertainty", "Config", "Versions"]:
        assert s in dom, s
    assert dom.count("data:image/png;base64") >= 2
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()], timeout=120, check=True,
                   capture_output=True)  # fmt: skip
    img = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert img.std() > 20 and (img < 128).mean() > 0.01  # text, figures and heatmaps, not a blank page
