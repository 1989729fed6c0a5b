"""The one interface every encoder has, and the configuration that travels with its weights."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderConfig:
    """What is needed to rebuild an encoder and feed it correctly.

    ``architecture`` names a registered builder and ``arch_args`` its keyword arguments.
    ``patch_size`` (pixels) and ``mpp`` (um/px) are the input the weights expect;
    ``code_size`` is the length of a code.  ``mean`` and ``std`` normalise RGB in [0, 1]
    (per channel) before the network; they belong to the weights and are applied inside
    :attr:`Encoder.module`, so they can never drift from them.
    """

    architecture: str
    code_size: int
    patch_size: int = 128
    mpp: float = 0.5
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    arch_args: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EncoderConfig:
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", (0.5,) * 3)), tuple(d.get("std", (0.5,) * 3))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


class Encoder:
    """A patch encoder: uint8 RGB patches (N, H, W, 3) in, float32 codes (N, C) out.

    ``module`` is a ``torch.nn.Module`` that takes float RGB in [0, 1], shape
    (N, 3, patch_size, patch_size), and returns (N, code_size); normalisation is inside
    it.  Training code uses ``module`` directly; compression calls :meth:`embed`.
    """

    def __init__(
        self, module: Any, config: EncoderConfig, checksum: str = "", source: dict[str, Any] | None = None
    ) -> None:
        self.module = module
        self.config = config
        self.checksum = checksum  # sha256 of the weights it was loaded from ("" if none)
        # Where the weights came from, e.g. {"format": "keras-h5", "file": ..., "sha256": ...};
        # kept through save/load so converted weights still name their origin.
        self.source: dict[str, Any] = dict(source or {})

    @property
    def code_size(self) -> int:
        return self.config.code_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def mpp(self) -> float:
        return self.config.mpp

    @property
    def name(self) -> str:
        return self.config.name or self.config.architecture

    @property
    def random_init(self) -> bool:
        """True when no weights were loaded (``checksum == ""``): the codes are those of a
        random initialisation, meaningless and different on every build unless seeded."""
        return not self.checksum

    @property
    def device(self) -> Any:
        import torch

        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: Any) -> Encoder:
        self.module.to(device)
        return self

    def for_inference(self) -> Encoder:
        """An encoder for embedding only: same config, checksum and codes (to ~1e-6).

        Where the architecture allows it (``module.fused_for_inference()``, e.g. nic-cnn
        folds its batch norms into the next layer), the module is a fused, frozen copy that
        is faster on a CPU; otherwise it is this encoder's module in eval mode.  Call it
        once before encoding many patches; train :attr:`module`, never the fused copy.
        """
        module = self.module
        fuse = getattr(module, "fused_for_inference", None)
        if callable(fuse):
            module = fuse()
        module.eval()
        return Encoder(module, self.config, self.checksum, self.source)

    def uint8_module(self, check: bool = True, autocast: Any = None) -> tuple[Any, bool]:
        """(module, folded): :attr:`module` as a module of uint8 RGB (N, 3, P, P), channels-last,
        computing the codes of ``module(x / 255)``; the float conversion happens inside it, on
        the module's device, so patches travel as uint8 (a quarter of the bytes).

        ``folded`` when the module offers ``fold_uint8_input()`` (the 1/255 and the
        normalisation folded into its first convolution, see :mod:`nic.encoders._layers`) and
        that form gives the plain form's codes on a probe of two random patches (float32,
        within 1e-3 of the codes' scale; ``check=False`` skips the probe).  Otherwise the
        plain form: the module behind a float conversion and a division by 255.  Call it on
        the inference copy (:meth:`for_inference`) after moving it to its device.

        ``autocast`` (a torch dtype such as ``torch.float16``): the precision the codes will
        be computed in.  The probe then also runs the folded form under that autocast and
        keeps it only if its error against the float32 codes is within the tolerance or no
        more than twice the plain form's own error at that precision: folding the 1/255 and
        the normalisation into the weights makes them small and the input uncentred, which
        costs half precision more than float32.
        """
        import torch

        from nic.encoders._layers import Uint8Input, uint8_form

        plain = Uint8Input(self.module).eval()
        folded = uint8_form(self.module)
        if isinstance(folded, Uint8Input) and folded.scale:
            return plain, False
        folded.eval()
        if not check:
            return folded, True
        p = self.patch_size
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 256, (2, p, p, 3), dtype=torch.uint8, generator=gen)
        probe = probe.to(self.device).permute(0, 3, 1, 2)  # channels-last (N, 3, P, P)
        with torch.inference_mode():
            want, got = plain(probe).float(), folded(probe).float()
        err = float((got - want).abs().max())
        tol = 1e-3 * (1.0 + float(want.abs().max()))
        if got.shape == want.shape and err <= tol and autocast is not None and autocast != torch.float32:
            with torch.inference_mode(), torch.autocast(probe.device.type, dtype=autocast):
                got_low, plain_low = folded(probe).float(), plain(probe).float()
            err = float((got_low - want).abs().max())
            err_plain = float((plain_low - want).abs().max())
            tol = max(10 * tol, 2 * err_plain)
        if got.shape != want.shape or not err <= tol:
            logger.warning(
                "%s: its input scaling folded into the first convolution gives other codes (max difference %.3g); "
                "encoding without the fold",
                self.name,
                err,
            )
            return plain, False
        logger.debug("%s: input scaling folded into the first convolution (probe difference %.2g)", self.name, err)
        return folded, True

    def embed(self, patches: Any) -> np.ndarray:
        """Codes of uint8 RGB patches (N, H, W, 3) as float32 (N, code_size), in eval mode."""
        import torch

        if isinstance(patches, np.ndarray):
            # torch warns on read-only arrays (e.g. np.asarray of a PIL image); copy those.
            patches = np.ascontiguousarray(patches) if patches.flags.writeable else np.array(patches)
        x = torch.as_tensor(patches)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"embed takes uint8 patches of shape (N, H, W, 3), got {tuple(x.shape)} {x.dtype}")
        self.module.eval()
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            x = x.contiguous(memory_format=torch.channels_last)
            return self.module(x).float().cpu().numpy()

    def __repr__(self) -> str:
        c = self.config
        return f"Encoder({self.name!r}, code {c.code_size}, {c.patch_size} px at {c.mpp} um/px)"
