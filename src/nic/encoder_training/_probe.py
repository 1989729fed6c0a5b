"""The linear probe: how well a frozen encoder's codes predict a patch label.

Codes of every patch are computed once; a logistic regression (classification) or ridge
regression (regression) on standardised codes is fitted on a training part and scored
on a held-out part: a group-aware split (no group on both sides, repeated ``repeats``
times with different seeds) or a given test set.  Needs scikit-learn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nic.errors import DataError, NicError
from nic.metrics import accuracy, auc, mae, spearman

logger = logging.getLogger(__name__)

__all__ = ["ProbeResult", "embed_table", "linear_probe", "probe_codes"]


@dataclass
class ProbeResult:
    """Probe scores: ``metrics`` is the mean over repeats and ``spread`` the standard deviation.

    Classification: ``accuracy`` and ``auc`` (macro one-vs-rest for > 2 classes: NaN when the
    test part lacks one of the classes, see :func:`nic.metrics.auc`);
    regression: ``spearman`` and ``mae`` (target units).
    """

    kind: str
    metrics: dict[str, float]
    spread: dict[str, float] = field(default_factory=dict)
    n_train: int = 0
    n_test: int = 0
    repeats: int = 1

    def line(self) -> str:
        """One line, e.g. ``accuracy 0.912 +- 0.010, auc 0.981 +- 0.004 (train 1350, test 450, 5 splits)``."""
        parts = []
        for k, v in self.metrics.items():
            sd = self.spread.get(k)
            parts.append(f"{k} {v:.3f}" + (f" ± {sd:.3f}" if sd is not None and self.repeats > 1 else ""))
        splits = f"{self.repeats} split{'s' if self.repeats > 1 else ''}"
        return f"{', '.join(parts)} (train {self.n_train}, test {self.n_test}, {splits})"


def embed_table(encoder: Any, table: Any, batch_size: int = 128) -> np.ndarray:
    """Codes (N, C) float32 of every patch of ``table``, at the encoder's patch size and um/px."""
    from nic.patches import PatchDataset

    ds = PatchDataset(table, encoder.patch_size, encoder.mpp, cache=False)
    codes = np.empty((len(ds), encoder.code_size), np.float32)
    for start in range(0, len(ds), batch_size):
        stop = min(start + batch_size, len(ds))
        batch = np.stack([ds.read(i) for i in range(start, stop)])
        codes[start:stop] = encoder.embed(batch)
    if not np.isfinite(codes).all():
        raise NicError(f"encoder {encoder.name} produced NaN or infinite codes on {table.source}")
    return codes


def _sklearn() -> Any:
    from sklearn import linear_model, pipeline, preprocessing

    return linear_model, pipeline, preprocessing


def probe_codes(
    kind: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, n_classes: int = 0
) -> dict[str, float]:
    """Fit a linear model on codes (N, C) and score it on the test codes.

    ``kind`` ``class``: logistic regression, returns accuracy and AUC; ``regr``: ridge
    regression, returns Spearman and MAE.
    """
    linear_model, pipeline, preprocessing = _sklearn()
    if kind == "class":
        model = pipeline.make_pipeline(
            preprocessing.StandardScaler(), linear_model.LogisticRegression(C=0.1, max_iter=3000)
        )
        model.fit(x_train, y_train)
        prob = np.zeros((len(x_test), max(n_classes, int(max(y_train.max(), y_test.max())) + 1)))
        prob[:, model.classes_] = model.predict_proba(x_test)
        return {"accuracy": accuracy(y_test, prob), "auc": auc(y_test, prob)}
    model = pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.RidgeCV(alphas=np.logspace(-2, 4, 13)))
    model.fit(x_train, y_train)
    pred = model.predict(x_test)
    return {"spearman": spearman(y_test, pred), "mae": mae(y_test, pred)}


def linear_probe(
    encoder: Any,
    data: Any,
    test: Any | None = None,
    test_fraction: float = 0.25,
    repeats: int = 1,
    seed: int = 0,
    codes: np.ndarray | None = None,
    random_init: bool = False,
) -> ProbeResult:
    """Probe a frozen ``encoder`` on the :class:`~nic.patches.PatchTable` ``data``.

    With ``test`` (a table with the same kind and class names) the model is fitted on all
    of ``data`` and scored on ``test``; otherwise ``repeats`` group-aware splits of
    ``data`` hold out ``test_fraction`` of its groups each.  ``codes`` may pass
    precomputed codes of ``data``.  An encoder without weights is refused
    (:class:`~nic.errors.EncoderError`) unless ``random_init`` (a deliberate baseline).
    """
    from nic.encoders import require_weights
    from nic.patches import group_split
    from nic.patches._datasets import warn_ungrouped

    require_weights(encoder, None, random_init)
    x = embed_table(encoder, data) if codes is None else codes
    if test is not None:
        if test.kind != data.kind:
            raise DataError(
                f"test set {test.source} is {test.kind}, data {data.source} is {data.kind}; give the same kind"
            )
        y_test = test.labels
        if data.kind == "class":
            unknown = sorted(set(test.classes) - set(data.classes))
            if unknown:
                raise DataError(f"test set {test.source} has classes {unknown} absent from {data.source}")
            lookup = {c: i for i, c in enumerate(data.classes)}
            y_test = np.asarray([lookup[test.classes[k]] for k in test.labels])
        scores = probe_codes(data.kind, x, data.labels, embed_table(encoder, test), y_test, len(data.classes))
        return ProbeResult(data.kind, scores, {}, len(data), len(test), 1)
    warn_ungrouped(data, data.source, "test")
    runs = []
    for r in range(repeats):
        labels = data.labels if data.kind == "class" else None
        tr, te = group_split(len(data), test_fraction, data.groups, labels, seed=seed + r)
        runs.append(probe_codes(data.kind, x[tr], data.labels[tr], x[te], data.labels[te], len(data.classes)))
    keys = list(runs[0])
    mean = {k: float(np.mean([s[k] for s in runs])) for k in keys}
    sd = {k: float(np.std([s[k] for s in runs])) for k in keys}
    return ProbeResult(data.kind, mean, sd, len(tr), len(te), repeats)
