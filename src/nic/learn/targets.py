"""Regression targets as the network sees them: an optional log or rank transform, then a
standard score with the fit cohort's mean and deviation.

Slide labels such as a mitotic score (a few to a hundred figures per mm2) are heavy-tailed:
with a squared loss on the raw scale a handful of high slides dominate the fit and the
order among the many low ones (what Spearman's rho measures) is hardly learnt. The kinds:

- ``none``: ``z = (y - mean) / std``;
- ``log``: ``z = (log(y + offset) - mean) / std``; ``offset`` is 0 when every target is
  positive, else half the smallest positive one (a count of 0 stays finite); negative
  targets are refused, and predictions are never below 0;
- ``rank``: normal scores, ``z = Phi^-1((rank - 0.5) / n)`` among the training targets
  (ties share their mean rank); new values are placed by linear interpolation between the
  training targets, and predictions map back the same way, so they stay within the
  training range;
- ``auto`` (the default): ``log`` when every target is >= 0 and the log makes the targets
  less skewed (``|skew(log)| < |skew(y)|``, the Box-Cox choice between lambda 1 and 0),
  else ``none``.

The kind and the log offset are decided once for a cohort, from all its targets
(:meth:`TargetScale.resolve`), so every fold of a run maps targets the same way and a
held-out 0 never meets a fold without an offset; the mean and deviation (and the rank
reference) come from each fold's training targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from scipy import stats

from nic.errors import DataError, OptionError

__all__ = ["TARGET_TRANSFORMS", "TargetScale"]

#: the kinds :meth:`TargetScale.fit` accepts
TARGET_TRANSFORMS = ("auto", "none", "log", "rank")


@dataclass(frozen=True)
class TargetScale:
    """A fitted map between targets ``y`` and network outputs ``z`` (see the module docstring)."""

    kind: str = "none"
    mean: float = 0.0
    std: float = 1.0
    offset: float = 0.0  #: log: added before the log
    reference: tuple[float, ...] = field(default=())  #: rank: the sorted training targets

    @staticmethod
    def resolve(y: np.ndarray, kind: str = "auto") -> tuple[str, float]:
        """The concrete kind (``auto`` decided) and log offset for a cohort's targets ``y``."""
        y = np.asarray(y, dtype=np.float64)
        if kind not in TARGET_TRANSFORMS:
            raise OptionError(f"`target_transform` must be one of {', '.join(TARGET_TRANSFORMS)} (got {kind!r})")
        if kind == "auto":
            kind = "log" if _log_helps(y) else "none"
        if kind != "log":
            return kind, 0.0
        if (y < 0).any():
            raise DataError(
                f"`target_transform` log needs targets >= 0 (the smallest is {y.min():g}); use rank or none"
            )
        return kind, _log_offset(y)

    @classmethod
    def fit(cls, y: np.ndarray, kind: str = "auto", offset: float | None = None) -> TargetScale:
        """The transform ``kind`` fitted on the training targets ``y``; ``offset`` (log) as
        :meth:`resolve` gave it for the whole cohort, else decided from ``y``."""
        y = np.asarray(y, dtype=np.float64)
        kind, own_offset = cls.resolve(y, kind)
        offset = own_offset if offset is None or kind != "log" else float(offset)
        reference: tuple[float, ...] = ()
        if kind == "rank":
            reference = tuple(float(v) for v in np.sort(y))
        t = cls(kind, 0.0, 1.0, offset, reference)._transform(y)
        return cls(kind, float(t.mean()), float(t.std() or 1.0), offset, reference)

    def _transform(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.kind == "log":
            # a value below the cohort's range (only possible outside the fitted cohort) is
            # held at the offset's floor rather than sent towards -inf
            return np.log(np.maximum(y + self.offset, self.offset or np.finfo(np.float64).tiny))
        if self.kind == "rank":
            return np.interp(y, self._ref, self._scores)
        return y

    @cached_property
    def _ref(self) -> np.ndarray:
        return np.asarray(self.reference)

    @cached_property
    def _scores(self) -> np.ndarray:
        """rank: the normal scores of the reference targets (once, not per batch)."""
        return _normal_scores(self._ref)

    def forward(self, y: np.ndarray) -> np.ndarray:
        """Targets -> standardised network targets (float32)."""
        return ((self._transform(y) - self.mean) / self.std).astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Network outputs -> predictions in the target's units."""
        t = np.asarray(z, dtype=np.float64) * self.std + self.mean
        if self.kind == "log":
            return np.maximum(np.exp(t) - self.offset, 0.0)
        if self.kind == "rank":
            return np.interp(t, self._scores, self._ref)
        return t

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std, "offset": self.offset,
                "reference": list(self.reference)}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TargetScale:
        return cls(str(d["kind"]), float(d["mean"]), float(d["std"]), float(d.get("offset", 0.0)),
                   tuple(float(v) for v in d.get("reference", ())))  # fmt: skip


def _normal_scores(sorted_y: np.ndarray) -> np.ndarray:
    """Blom-free normal scores ``Phi^-1((rank - 0.5) / n)`` of sorted targets, ties averaged."""
    r = stats.rankdata(sorted_y)
    return stats.norm.ppf((r - 0.5) / len(sorted_y))


def _log_offset(y: np.ndarray) -> float:
    """0 when every target is positive, else half the smallest positive one (1 when none is)."""
    if (y > 0).all():
        return 0.0
    pos = y[y > 0]
    return float(pos.min() / 2) if len(pos) else 1.0


def _log_helps(y: np.ndarray) -> bool:
    """Whether ``log`` makes non-negative targets less skewed than they are."""
    if len(y) < 3 or (y < 0).any() or np.ptp(y) == 0:
        return False
    ly = np.log(y + _log_offset(y))
    return bool(abs(stats.skew(ly)) < abs(stats.skew(y)))
