"""``nic report``: one self-contained HTML page per training run.

Everything is inline (SVG figures, PNG heatmaps as data URIs, no script, no network), so
the file can be mailed, archived or opened offline.  Sections: the metrics with 95% CIs
and the per-fold table; the task's curves (ROC, precision-recall and a reliability
diagram with the expected calibration error for classifiers; predicted against true for
regression; Kaplan-Meier curves of predicted risk groups with the log-rank p-value,
time-dependent AUC and the integrated Brier score for survival); the spread of each
patient's prediction over test views; a gallery of heatmaps of the most and least
confident patients (each from the fold model that predicted it); training curves; the
config, a data summary and package versions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import platform
import re
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from nic.learn.metrics import survival_analysis
from nic.metrics import auc, expected_calibration_error, spearman

__all__ = ["write_report", "report_html"]

logger = logging.getLogger(__name__)

_PACKAGES = ("neural-image-compression", "torch", "numpy", "scikit-learn", "scikit-survival", "lifelines", "zarr",
             "timm", "openslide-python", "matplotlib")  # fmt: skip
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1.5em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.figs{display:flex;flex-wrap:wrap;gap:1em}
.figs>div{flex:1 1 320px}.gallery{display:grid;grid-template-columns:repeat(3,1fr);gap:.8em}
.gallery img{width:100%;border:1px solid #ddd}.note{color:#666;font-size:.92em}pre{background:#f7f7f7;padding:.8em;
overflow:auto;font-size:12px}
"""


def _svg(fig: Any) -> str:
    from matplotlib import pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # creation date, licence namespaces


def _figure(w: float = 4.2, h: float = 3.4) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(figsize=(w, h), dpi=100)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _metrics_section(metrics: dict[str, Any]) -> str:
    rows = []
    n_folds = max((len(m.get("folds") or []) for m in metrics.values()), default=0)
    head = "".join(f"<th>fold {k}</th>" for k in range(n_folds))
    for name, m in metrics.items():
        lo, hi = m.get("ci95") or (None, None)
        folds = "".join(f"<td>{_fmt(v)}</td>" for v in m.get("folds") or [])
        rows.append(f"<tr><td>{html.escape(name)}</td><td><b>{_fmt(m.get('value'))}</b></td>"
                    f"<td>{_fmt(lo)} - {_fmt(hi)}</td>{folds}</tr>")  # fmt: skip
    return (f"<h2>Metrics</h2><p class=note>Pooled out-of-fold value, 95% bootstrap interval over patients, and each "
            f"fold's value.</p><table><tr><th>metric</th><th>pooled</th><th>95% CI</th>{head}</tr>{''.join(rows)}"
            "</table>")  # fmt: skip


def _binary_figures(y: np.ndarray, p: np.ndarray, label: str = "") -> tuple[list[str], float]:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    figs = []
    fig, ax = _figure()
    fpr, tpr, _ = roc_curve(y, p)
    ax.plot(fpr, tpr, label=f"AUC {auc(y, p):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {label}".strip())
    ax.legend(loc="lower right")
    figs.append(_svg(fig))
    fig, ax = _figure()
    prec, rec, _ = precision_recall_curve(y, p)
    ax.plot(rec, prec, label=f"average precision {average_precision_score(y, p):.3f}")
    ax.axhline(float(np.mean(y)), ls=":", color="grey", label=f"prevalence {np.mean(y):.2f}")
    ax.set(xlabel="recall", ylabel="precision", title=f"precision-recall {label}".strip(), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    figs.append(_svg(fig))
    ece = expected_calibration_error(y, p)
    fig, ax = _figure()
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    ax.plot(mean, frac, "o-", label=f"ECE {ece:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title=f"reliability {label}".strip())
    ax.legend(loc="upper left")
    figs.append(_svg(fig))
    return figs, ece


def _task_section(task: str, pred: Any, classes: list[str] | None = None) -> str:
    """``classes``: the run's classes in its own order (the last of two is the positive one)."""
    parts: list[str] = []
    notes = ""
    if task == "binary":
        assert classes is not None and len(classes) == 2
        y = (pred["target"] == classes[-1]).to_numpy().astype(int)
        figs, ece = _binary_figures(y, pred["probability"].to_numpy())
        parts += figs
        notes = f"Positive class: {html.escape(classes[-1])}. Expected calibration error {ece:.3f} (10 bins)."
    elif task == "multiclass":
        cols = [c for c in pred.columns if c.startswith("prob_")]
        classes = [c[5:] for c in cols]
        probs = pred[cols].to_numpy()
        y = np.array([classes.index(str(t)) for t in pred["target"]])
        for k, c in enumerate(classes):
            if 0 < (y == k).sum() < len(y):
                parts += _binary_figures((y == k).astype(int), probs[:, k], f"({c} vs rest)")[:2]
        ece = expected_calibration_error(y, probs)
        fig, ax = _figure()
        conf, hit = probs.max(1), probs.argmax(1) == y
        edges = np.linspace(0, 1, 11)
        which = np.clip(np.digitize(conf, edges) - 1, 0, 9)
        xs = [conf[which == b].mean() for b in range(10) if (which == b).any()]
        ys = [hit[which == b].mean() for b in range(10) if (which == b).any()]
        ax.plot(xs, ys, "o-", label=f"top-label ECE {ece:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="confidence", ylabel="accuracy", title="reliability (top label)")
        ax.legend(loc="upper left")
        parts.append(_svg(fig))
        notes = f"One-vs-rest curves per class; top-label expected calibration error {ece:.3f} (10 bins)."
    elif task == "regression":
        y, p = pred["target"].to_numpy(float), pred["prediction"].to_numpy(float)
        fig, ax = _figure(4.6, 4.2)
        ax.errorbar(y, p, yerr=pred["spread"].to_numpy(float) if "spread" in pred else None, fmt="o", ms=4, alpha=0.7,
                    elinewidth=0.8)  # fmt: skip
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], ":", color="grey", label="identity")
        ax.set(xlabel="true", ylabel="predicted (out of fold)", title=f"Spearman {spearman(y, p):.3f}")
        ax.legend(loc="upper left")
        parts.append(_svg(fig))
        notes = "Error bars: the spread of each patient's prediction over its test views (crops x dihedral variants)."
    else:
        t, e, r = pred["time"].to_numpy(float), pred["event"].to_numpy(int), pred["risk"].to_numpy(float)
        try:
            a = survival_analysis(t, e, r)
        except Exception as ex:  # lifelines/scikit-survival refuse cohorts too small or tied to analyse
            why = html.escape(f"{type(ex).__name__}: {ex}")
            notes = (f"Kaplan-Meier by risk group, log-rank test, time-dependent AUC and Brier score could not be "
                     f"computed for these {len(t)} patients ({int(e.sum())} events, {len(np.unique(r))} distinct "
                     f"risks) ({why}); that needs more patients and events.")  # fmt: skip
            return f"<h2>Survival</h2><p class=note>{notes}</p>"
        fig, ax = _figure(4.8, 3.6)
        names = ["low risk", "middle risk", "high risk"] if len(a.km) == 3 else [f"group {g}" for g in range(len(a.km))]
        for g, (tt, ss) in enumerate(a.km):
            ax.step(tt, ss, where="post", label=f"{names[g]} (n={int((a.groups == g).sum())})")
        ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02),
               title=f"Kaplan-Meier by predicted risk tertile; log-rank p = {a.logrank_p:.2g}")  # fmt: skip
        ax.legend(loc="lower left", fontsize=9)
        parts.append(_svg(fig))
        fig, ax = _figure()
        ax.plot(a.times, a.td_auc, "o-", label=f"mean {a.mean_td_auc:.3f}")
        ax.axhline(0.5, ls=":", color="grey")
        ax.set(xlabel="time", ylabel="cumulative/dynamic AUC", ylim=(0, 1), title="time-dependent AUC")
        ax.legend(loc="lower right")
        parts.append(_svg(fig))
        notes = (f"Time-dependent AUC at the 25/50/75% quantiles of the event times: "
                 f"{', '.join(f'{v:.3f}' for v in a.td_auc)} (mean {a.mean_td_auc:.3f}). Integrated Brier score "
                 f"{a.ibs:.3f} (Kaplan-Meier alone {a.ibs_km:.3f}; lower is better), survival functions from the "
                 "Breslow baseline of the pooled out-of-fold log-risks (z-scored per fold), so slightly optimistic. "
                 "Computed with lifelines and scikit-survival.")  # fmt: skip
    title = {"binary": "Classification", "multiclass": "Classification", "regression": "Regression"}.get(
        task, "Survival"
    )
    figs = "".join(f"<div>{p}</div>" for p in parts)
    return f"<h2>{title}</h2><p class=note>{notes}</p><div class=figs>{figs}</div>"


def _confidence(task: str, pred: Any) -> np.ndarray:
    if task == "binary":
        return np.abs(pred["probability"].to_numpy(float) - 0.5)
    if task == "multiclass":
        return pred[[c for c in pred.columns if c.startswith("prob_")]].to_numpy().max(1)
    col = "prediction" if task == "regression" else "risk"
    v = pred[col].to_numpy(float)
    return np.abs(v - np.median(v))


def _uncertainty_section(pred: Any) -> str:
    if "spread" not in pred:
        return ""
    s = pred["spread"].to_numpy(float)
    fig, ax = _figure(4.2, 2.8)
    ax.hist(s[np.isfinite(s)], bins=20, color="#4a7bb7")
    ax.set(xlabel="spread of the prediction over test views", ylabel="patients")
    top = pred.sort_values("spread", ascending=False).head(5)
    rows = "".join(f"<tr><td>{html.escape(str(r.patient))}</td><td>{r.spread:.3f}</td></tr>" for r in top.itertuples())
    return (f"<h2>Per-patient uncertainty</h2><p class=note>The standard deviation of each patient's prediction over "
            f"the views it was predicted from (test crops x the 8 dihedral variants); also the <code>spread</code> "
            f"column of predictions.csv.</p><div class=figs><div>{_svg(fig)}</div><div><table><tr><th>least certain "
            f"patients</th><th>spread</th></tr>{rows}</table></div></div>")  # fmt: skip


def _gallery_section(run: Any, pred: Any, n: int = 3) -> str:
    from nic.explain._heatmap import default_method, slide_heatmap
    from nic.explain._overlays import heatmap_png
    from nic.learn.data import LabelSpec, SlideSource, load_cohort
    from nic.learn.run import Run
    from nic.store import open_store

    cfg = run.config
    try:
        spec = LabelSpec(**{**cfg["labels"], "labels": Path(cfg["labels"]["labels"])})
        cohort = load_cohort(Path(cfg["compressed"]), spec)
    except Exception as e:  # the stores or labels may have moved since training
        why = html.escape(str(e))
        return f"<h2>Heatmaps</h2><p class=note>Not drawn: the run's stores or labels cannot be read ({why}).</p>"
    conf = _confidence(run.task, pred)
    order = np.argsort(conf)
    picks = [("most confident", i) for i in order[::-1][:n]] + [("least confident", i) for i in order[:n]]
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, i in picks:
            row = pred.iloc[int(i)]
            k = int(row["fold"]) if "fold" in pred else 0
            fold_run = Run(run.path, run.config, [run.models[k]], run.encoder)
            pidx = cohort.patients.index(str(row["patient"]))
            sidx = cohort.slides_of([pidx])[0]
            src = SlideSource.open(cohort.store_paths[sidx])
            hm = slide_heatmap(fold_run, src)
            meta = open_store(src.path, verify="none").meta
            value = {"binary": "probability", "regression": "prediction", "survival": "risk"}.get(run.task)
            shown = f"{value} {row[value]:.3f}" if value else f"predicted {row['prediction']}"
            caption = f"{kind}: patient {row['patient']}, slide {src.slide_id}, {shown} (fold {k})"
            try:
                png = heatmap_png(hm, meta, Path(tmp) / f"{i}.png", max_side=480, title=caption)
                data = base64.b64encode(png.read_bytes()).decode()
                cells.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                             f"<figcaption class=note>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
            except Exception as e:  # a store without slide geometry (e.g. made by hand)
                cells.append(f"<p class=note>{html.escape(caption)}: no picture ({html.escape(str(e))})</p>")
    method = default_method(run.models[0].name)
    return (f"<h2>Heatmaps</h2><p class=note>Where each fold model's evidence lies on the slide ({method}): red "
            f"pushes the output up, blue down. Each patient is explained by the fold model that predicted it.</p>"
            f"<div class=gallery>{''.join(cells)}</div>")  # fmt: skip


def _history_section(run_dir: Path) -> str:
    try:
        folds = json.loads((run_dir / "folds.json").read_text())
    except (OSError, ValueError):
        return ""
    fig, ax = _figure(5.0, 3.0)
    for f in folds:
        h = f["history"]
        ax.plot(h["train_loss"], label=f"fold {f['fold']} train")
        ax.plot(h["val_loss"], ":", label=f"fold {f['fold']} validation")
    ax.set(xlabel="epoch", ylabel="loss", title="training curves")
    ax.legend(fontsize=7, ncol=2)
    stages = [_stage_spans(f["history"].get("stage", [])) for f in folds]
    note = ""
    if any(len(sp) > 1 for sp in stages):
        rows = "".join(
            f"<li>fold {f['fold']}: " + ", ".join(f"{name} {a}-{b}" for name, a, b in sp) + "</li>"
            for f, sp in zip(folds, stages)
        )
        note = (
            "<p class=note>The curves run through the training stages in order (ratio: nic-cnn's cell-ratio "
            "branch, its starts one after the other, the best kept; conv: the convolutional path on what the branch "
            f"leaves). Epochs of each stage:</p><ul class=note>{rows}</ul>"
        )
    return f"<h2>Training</h2><div class=figs><div>{_svg(fig)}</div></div>{note}"


def _stage_spans(stage: list[str]) -> list[tuple[str, int, int]]:
    """Runs of equal stage labels as (label, first epoch, last epoch)."""
    spans: list[tuple[str, int, int]] = []
    for i, name in enumerate(stage):
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], i)
        else:
            spans.append((name, i, i))
    return spans


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def report_html(run_dir: str | Path, gallery: int = 3) -> str:
    """The HTML of the report of the run in ``run_dir`` (see the module docstring)."""
    import pandas as pd

    from nic.learn import load_run

    run = load_run(run_dir)
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    text = {"patient": str}  # ids and class names as written ("007", "10"), never parsed as numbers
    if run.task in ("binary", "multiclass"):
        text.update(target=str, prediction=str)
    pred = pd.read_csv(run_dir / "predictions.csv", dtype=text, keep_default_na=False, na_values=[""])
    cfg = run.config
    task = run.task
    n_slides = int(pred["n_slides"].sum()) if "n_slides" in pred else len(pred)
    if task == "survival":
        balance = f"{int(pred['event'].sum())} events, {int((1 - pred['event']).sum())} censored"
    elif task in ("binary", "multiclass"):
        counts = pred["target"].astype(str).value_counts().sort_index()
        balance = ", ".join(f"{k}: {v}" for k, v in counts.items())
    else:
        t = pred["target"]
        balance = f"target {t.min():.3g} to {t.max():.3g} (median {t.median():.3g})"
    enc = run.encoder.describe() if run.encoder is not None else "not recorded"
    summary = (f"<table><tr><td>task</td><td>{task}</td></tr><tr><td>model</td><td>{html.escape(run.models[0].name)}"
               f"</td></tr><tr><td>patients / slides</td><td>{len(pred)} / {n_slides}</td></tr><tr><td>labels</td><td>"
               f"{html.escape(balance)}</td></tr><tr><td>folds</td><td>{len(run.models)} (by patient)</td></tr><tr><td>"
               f"encoder of the stores</td><td>{html.escape(enc)}</td></tr></table>")  # fmt: skip
    sections = [
        f"<h1>nic run report: {html.escape(run_dir.name)}</h1><p class=note>{html.escape(str(run_dir.resolve()))}</p>",
        f"<h2>Data</h2>{summary}",
        _metrics_section(metrics),
        _task_section(task, pred, run.models[0].classes),
        _uncertainty_section(pred),
        _gallery_section(run, pred, gallery) if gallery else "",
        _history_section(run_dir),
        f"<h2>Config</h2><pre>{html.escape(json.dumps(cfg, indent=2))}</pre>",
        f"<h2>Versions</h2><pre>{html.escape(json.dumps(_versions(), indent=2))}</pre>",
    ]
    body = "\n".join(s for s in sections if s)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>nic report {html.escape(run_dir.name)}"
            f"</title><style>{_CSS}</style></head><body>{body}</body></html>")  # fmt: skip


def write_report(run_dir: str | Path, out: str | Path, gallery: int = 3) -> Path:
    """Write :func:`report_html` of ``run_dir`` to ``out`` (replaced whole, never half-written)."""
    from nic._outputs import check_writable, write_atomic

    out = Path(out)
    check_writable(out)
    text = report_html(run_dir, gallery)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return out
