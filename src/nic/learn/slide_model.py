"""A trained slide-level network with what is needed to use it, and its test-time views.

:class:`SlideModel` holds the network, the task, the crop side, the regression target map
(:class:`~nic.learn.targets.TargetScale`) and class names; it saves to and loads from a
``model.safetensors`` + ``model.json`` pair, and predicts a slide by averaging its test
views (crops x dihedral variants).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nic.errors import DataError, NicError
from nic.learn.data import SlideSource, dihedral, sample_crop_origin
from nic.learn.models import ModelSpec, create_model
from nic.learn.targets import TargetScale

__all__ = ["SlideModel", "patient_mean"]


def _to_device(arrays: list[np.ndarray], dev: torch.device) -> torch.Tensor:
    """Stack same-shape views (crops or masks) into one batch tensor on ``dev``."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).to(dev, non_blocking=True)


@dataclass
class SlideModel:
    """A trained network with what is needed to use it: task, crop, target scaling, classes."""

    name: str
    spec: ModelSpec
    task: str
    crop: int
    net: torch.nn.Module
    target: TargetScale = field(default_factory=TargetScale)  #: regression: targets <-> outputs
    classes: list[str] | None = None
    #: survival: (mean, std) of the fold's out-of-fold log-risks, which the model's risks are
    #: standardised with (the Cox loss fixes neither offset nor scale, and each fold's model has its
    #: own); None for models of runs written before nic recorded it (risks as the network gives them)
    risk_scale: tuple[float, float] | None = None

    def meta(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "spec": asdict(self.spec),
            "task": self.task,
            "crop": self.crop,
            "target": self.target.to_json(),
            "classes": self.classes,
            "risk_scale": None if self.risk_scale is None else list(self.risk_scale),
        }

    def save(self, folder: Path) -> None:
        """``folder/model.safetensors`` (weights) and ``folder/model.json`` (the rest)."""
        from nic._outputs import save_safetensors

        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}, folder / "model.safetensors"
        )
        (folder / "model.json").write_text(json.dumps(self.meta(), indent=2))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> SlideModel:
        """A model with fresh weights as :meth:`meta` describes it (load the weights next)."""
        spec = ModelSpec(**meta["spec"])
        net = create_model(meta["model"], spec)
        rs = meta.get("risk_scale")
        return cls(meta["model"], spec, meta["task"], int(meta["crop"]), net, _target_scale(meta), meta["classes"],
                   None if rs is None else (float(rs[0]), float(rs[1])))  # fmt: skip

    @classmethod
    def load(cls, folder: Path) -> SlideModel:
        """The model saved by :meth:`save` in ``folder``; :class:`DataError` for a missing or damaged one."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        damaged = "the run is damaged; retrain it with `nic train`"
        try:
            meta = json.loads((folder / "model.json").read_text())
            state = load_file(str(folder / "model.safetensors"))
        except (OSError, ValueError) as e:
            raise DataError(f"{folder}: not a saved nic slide model ({e}); train one with `nic train`") from e
        except SafetensorError as e:
            raise DataError(f"{folder}: model.safetensors is not a readable weight file ({e}); {damaged}") from e
        try:
            model = cls.from_meta(meta)
            net = model.net
        except (KeyError, TypeError, ValueError, NicError) as e:
            why = f"no {e} entry" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{folder}: model.json does not describe a nic slide model ({why}); {damaged}") from e
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise DataError(
                f"{folder}: the weights in model.safetensors do not fit the {model.name!r} model of"
                f" model.json ({_state_mismatch(net.state_dict(), state)}); {damaged}"
            ) from e
        net.eval()
        return model

    def to_prediction(self, raw: np.ndarray) -> np.ndarray:
        """Raw outputs (N, n_out) -> (N,) values / probabilities / log-risks, or (N, K) probabilities.

        Log-risks are standardised with :attr:`risk_scale` when the model has one.
        """
        if self.task == "regression":
            return self.target.inverse(raw[:, 0])
        if self.task == "binary":
            return 1 / (1 + np.exp(-raw[:, 0]))
        if self.task == "multiclass":
            e = np.exp(raw - raw.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        if self.risk_scale is not None:
            return (raw[:, 0] - self.risk_scale[0]) / self.risk_scale[1]
        return raw[:, 0]

    def predict_raw(
        self, sources: list[SlideSource], n_crops: int, variants: bool, seed: int = 0, batch: int = 16
    ) -> np.ndarray:
        """(S, n_out) raw outputs per slide, averaged over test crops and variants
        (the mean of :meth:`predict_views`)."""
        return np.stack([v.mean(0) for v in self.predict_views(sources, n_crops, variants, seed, batch)])

    @torch.no_grad()
    def predict_views(
        self, sources: list[SlideSource], n_crops: int, variants: bool, seed: int = 0, batch: int = 16
    ) -> list[np.ndarray]:
        """Per slide, the raw outputs (V, n_out) of every test view: crops x variants.

        Crops: one centred window when the slide fits in the crop, else ``n_crops`` centres
        drawn (seeded) in proportion to distance from background.  Variants: the 8 stored
        variants with their grid transform, or the 8 grid rotations/flips of a 1-variant store.
        """
        self.net.eval()
        dev = next(self.net.parameters()).device
        out = []
        for si, src in enumerate(sources):
            rng = np.random.default_rng([seed, si])
            h, w = src.grid_shape
            if h <= self.crop and w <= self.crop:
                origins = [sample_crop_origin(src.weights, self.crop, None, center=(h // 2, w // 2))]
            else:
                origins = [sample_crop_origin(src.weights, self.crop, rng) for _ in range(max(1, n_crops))]
            ks = range(8) if variants else [0]
            views = [(o, k) for o in origins for k in ks]
            acc = []
            for b in range(0, len(views), batch):
                xs, ms = [], []
                for (y0, x0), k in views[b : b + batch]:
                    f, m = src.crop(y0, x0, self.crop, k if src.variants == 8 else 0)
                    xs.append(dihedral(f, k))
                    ms.append(dihedral(m, k))
                acc.append(self.net(_to_device(xs, dev), _to_device(ms, dev)).double().cpu().numpy())
            out.append(np.concatenate(acc))
        return out

    def spread(self, views: np.ndarray) -> float:
        """Standard deviation over views (V, n_out) of the converted prediction: the value,
        probability or log-risk (multiclass: the probability of the class the mean picks)."""
        pred = self.to_prediction(views)
        if pred.ndim == 2:
            pred = pred[:, int(pred.mean(0).argmax())]
        return float(pred.std())


def _target_scale(meta: dict[str, Any]) -> TargetScale:
    """The target map of a saved model; runs saved before transforms had a plain mean and std."""
    if "target" in meta:
        return TargetScale.from_json(meta["target"])
    return TargetScale("none", float(meta["target_mean"]), float(meta["target_std"]))


def _state_mismatch(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """One line on how a loaded state dict differs from a model's own."""
    parts = []
    if missing := [k for k in want if k not in got]:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if extra := [k for k in got if k not in want]:
        parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    if shaped := [k for k in want if k in got and got[k].shape != want[k].shape]:
        k = shaped[0]
        parts.append(
            f"{len(shaped)} of another shape, e.g. {k} {tuple(got[k].shape)} instead of {tuple(want[k].shape)}"
        )
    return "; ".join(parts) or "the tensors do not match"


def patient_mean(raw: np.ndarray, slide_patient: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Mean of slide outputs (S, n_out) per patient in ``patients`` order -> (P, n_out)."""
    return np.stack([raw[slide_patient == p].mean(0) for p in patients])
