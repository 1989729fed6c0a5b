"""The unsupervised encoder methods as Lightning modules: VAE, siamese contrastive, BiGAN.

Every module wraps a trainable encoder module (float RGB [0, 1] (N, 3, P, P) -> (N, C));
the exported encoder is that module alone.  Batches hold uint8 patches (N, 3, P, P);
training batches are colour-augmented on the device (:class:`ColorAugment`, as the
multitask encoder).  Each module has ``preview(x)``: rows of pictures (N, 3, H, W) in
[0, 1] that show what it learned (reconstructions, samples, pairs).

- :class:`Decoder`          code -> image: the nic-cnn encoder mirrored (transposed convs)
- :class:`VaeModule`        variational autoencoder: encoder mean + log-variance head, decoder
- :class:`SiameseModule`    do two patches come from one neighbourhood (adjacent) or not
- :class:`BiganModule`      encoder, generator and discriminator on (image, code) pairs
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from nic.encoder_training._config import UPSAMPLE
from nic.errors import EncoderError, check_choice
from nic.patches.augment import AugmentConfig, ColorAugment

logger = logging.getLogger(__name__)

__all__ = ["Decoder", "VaeModule", "SiameseModule", "BiganModule", "vae_loss"]


def _mirror_sides(encoder: nn.Module, patch_size: int) -> list[int]:
    """Feature-map sides (pixels) of a nic-cnn module, from its pooled input to its last block."""
    needed = ("feature_shape", "forward_features", "head", "pool", "blocks")
    if not all(hasattr(encoder, a) for a in needed):
        raise EncoderError(
            f"this method needs a nic-cnn encoder (it mirrors its layers), got {type(encoder).__name__}; "
            "use `encoder=nic-cnn` (or a nic-cnn .h5 / saved encoder)"
        )
    pool = encoder.pool.kernel_size if isinstance(encoder.pool, nn.AvgPool2d) else 1
    pool = int(pool[0] if isinstance(pool, tuple) else pool)
    return _forward_sides(patch_size // pool, len(encoder.blocks))


def _forward_sides(pooled: int, depth: int) -> list[int]:
    sides = [pooled]
    for _ in range(depth):
        sides.append((sides[-1] - 3) // 2 + 1)
    return sides


class Decoder(nn.Module):
    """Code (N, C) -> image (N, 3, S, S) in [-1, 1], S the encoder's pooled input side.

    The nic-cnn encoder mirrored: Dense to the last feature map (``width`` channels), then
    per encoder block an upsampling step -> batch norm -> LeakyReLU(0.2), halving the
    channels after the first (as DCGAN generators do: a full-width decoder costs ~15x more
    on a CPU), and a 3x3 convolution to RGB with tanh.  ``sides`` are the encoder's
    feature-map sides, pooled input first.  ``upsample``: ``transposed``, a 3x3 stride-2
    transposed convolution (the encoder's layers mirrored); ``resize``, nearest-neighbour
    resizing to the next side then a 3x3 convolution, which cannot draw the checkerboard a
    3x3 kernel at stride 2 leaves (its output pixels get 1 or 2 kernel taps by parity).
    """

    def __init__(self, code_size: int, width: int, sides: list[int], upsample: str = "transposed") -> None:
        super().__init__()
        check_choice("upsample", upsample, UPSAMPLE)
        self.width, self.side = width, sides[-1]
        self.fc = nn.Linear(code_size, width * self.side * self.side)
        self.pre = nn.Sequential(nn.BatchNorm1d(width * self.side * self.side), nn.LeakyReLU(0.2))
        ups: list[nn.Module] = []
        chans = width
        for i, (big, small) in enumerate(zip(reversed(sides[:-1]), reversed(sides[1:]))):
            out = chans if i == 0 else max(chans // 2, 8)
            if upsample == "resize":
                ups += [nn.Upsample(size=(big, big), mode="nearest"), nn.Conv2d(chans, out, 3, padding=1)]
            else:
                pad = big - ((small - 1) * 2 + 3)
                ups.append(nn.ConvTranspose2d(chans, out, 3, stride=2, output_padding=pad))
            ups += [nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            chans = out
        self.ups = nn.Sequential(*ups)
        self.to_rgb = nn.Conv2d(chans, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.pre(self.fc(z)).view(-1, self.width, self.side, self.side)
        return torch.tanh(self.to_rgb(self.ups(h)))


def vae_loss(
    recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, reconstruction, KL) per pixel of one image: squared error summed over the image
    plus ``kl_weight`` times KL(q(z|x) || N(0, I)) summed over the code, both averaged over
    the batch and divided by the image's number of values."""
    n = target[0].numel()
    rec = (recon - target).square().flatten(1).sum(1).mean()
    kl = (-0.5 * (1 + logvar - mu.square() - logvar.exp())).sum(1).mean()
    return (rec + kl_weight * kl) / n, rec / n, kl


class _Base(L.LightningModule):
    """Shared pieces: augmentation, uint8 -> float, the encoder's view of the input, Adam."""

    def __init__(self, encoder: nn.Module, lr: float, augment: AugmentConfig, seed: int | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.lr = float(lr)
        self.augment = ColorAugment(augment, seed=seed)

    def _inputs(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.float().div_(255.0)
        if train:
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = self.augment(x)
        return x.contiguous(memory_format=torch.channels_last)

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        """What a decoder or discriminator sees: the pooled input scaled to [-1, 1]."""
        return self.encoder.pool(x) * 2 - 1

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class VaeModule(_Base):
    """Variational autoencoder around a nic-cnn encoder: the encoder's code is the mean,
    a linear head on the same features gives the log-variance, a mirrored decoder
    reconstructs the pooled input.  Logs ``train_loss``, ``val_loss``, ``val_recon``, ``val_kl``."""

    def __init__(
        self,
        encoder: nn.Module,
        code_size: int,
        patch_size: int,
        lr: float = 1e-3,
        kl_weight: float = 0.01,
        augment: AugmentConfig = AugmentConfig(),
        seed: int | None = 0,
        upsample: str = "transposed",
    ) -> None:
        super().__init__(encoder, lr, augment, seed)
        sides = _mirror_sides(encoder, patch_size)
        self.logvar = nn.Linear(encoder.head.in_features, code_size)
        self.decoder = Decoder(code_size, encoder.feature_shape[0], sides, upsample)
        self.kl_weight = float(kl_weight)
        self.save_hyperparameters({"lr": lr, "kl_weight": kl_weight, "code_size": code_size})

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.encoder.forward_features(x).permute(0, 2, 3, 1).flatten(1)
        return self.encoder.head(flat), self.logvar(flat).clamp(-8.0, 8.0)

    def _loss(self, images: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self._inputs(images, train)
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if train else mu
        return vae_loss(self.decoder(z), self._target(x), mu, logvar, self.kl_weight)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, rec, kl = self._loss(batch, True)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch.shape[0])
        self.log("train_recon", rec, batch_size=batch.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, rec, kl = self._loss(batch, False)
        n = batch.shape[0]
        self.log("val_loss", loss, prog_bar=True, batch_size=n, on_epoch=True, on_step=False, sync_dist=True)
        self.log("val_recon", rec, batch_size=n, on_epoch=True, on_step=False, sync_dist=True)
        self.log("val_kl", kl, batch_size=n, on_epoch=True, on_step=False, sync_dist=True)

    @torch.no_grad()
    def preview(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Rows: the pooled inputs, their reconstructions (from the mean code)."""
        x = self._inputs(images, False)
        mu, _ = self.encode(x)
        return [(self._target(x) + 1) / 2, (self.decoder(mu) + 1) / 2]


class SiameseModule(_Base):
    """The reference's contrastive task: do two patches come from one neighbourhood?

    Both patches go through the shared encoder (each augmented independently); a small
    head on the symmetric pair features ``[a * b, |a - b|]`` gives the logit of "same
    neighbourhood".  Binary cross-entropy; logs ``val_loss`` and ``val_acc``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        code_size: int,
        lr: float = 1e-3,
        augment: AugmentConfig = AugmentConfig(),
        seed: int | None = 0,
    ) -> None:
        super().__init__(encoder, lr, augment, seed)
        self.head = nn.Sequential(nn.Linear(2 * code_size, code_size), nn.LeakyReLU(0.2), nn.Linear(code_size, 1))
        self.save_hyperparameters({"lr": lr, "code_size": code_size})

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        za, zb = self.encoder(a), self.encoder(b)
        return self.head(torch.cat([za * zb, (za - zb).abs()], 1)).squeeze(1)

    def _loss(self, batch: Any, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, y = batch
        logit = self(self._inputs(a, train), self._inputs(b, train))
        loss = F.binary_cross_entropy_with_logits(logit, y.float())
        acc = ((logit > 0).float() == y).float().mean()
        return loss, acc

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, acc = self._loss(batch, True)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch[0].shape[0])
        self.log("train_acc", acc, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, acc = self._loss(batch, False)
        n = batch[0].shape[0]
        self.log("val_loss", loss, prog_bar=True, batch_size=n, on_epoch=True, on_step=False, sync_dist=True)
        self.log("val_acc", acc, prog_bar=True, batch_size=n, on_epoch=True, on_step=False, sync_dist=True)

    @torch.no_grad()
    def preview(self, batch: Any) -> list[torch.Tensor]:
        """Rows: first patches, second patches, and a bar per pair: the predicted probability
        of "same neighbourhood" as grey level, with a green (same) or red (different) truth border."""
        a, b, y = batch
        xa, xb = self._inputs(a, False), self._inputs(b, False)
        p = torch.sigmoid(self(xa, xb))
        bar = p.view(-1, 1, 1, 1).expand(-1, 3, xa.shape[2], xa.shape[3]).clone()
        edge = max(2, xa.shape[2] // 16)
        colour = torch.stack([1 - y.float(), y.float(), torch.zeros_like(y.float())], 1).view(-1, 3, 1, 1)
        for sl in ((slice(None), slice(None), slice(0, edge)), (slice(None), slice(None), slice(-edge, None))):
            bar[sl] = colour.expand_as(bar[sl])
        return [xa.float(), xb.float(), bar]


class _Discriminator(nn.Module):
    """D(x, z): convolutions on the image (S x S in [-1, 1]), a dense layer on the code,
    joined by two dense layers with dropout; spectral norm on every weight.  ``width``
    (64 for the reference encoder: half its width) sets every layer's size."""

    def __init__(self, code_size: int, width: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.x = nn.Sequential(
            sn(nn.Conv2d(3, width, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * width, 2 * width, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.z = nn.Sequential(sn(nn.Linear(code_size, 4 * width)), nn.LeakyReLU(0.2))
        self.joint = nn.Sequential(
            nn.Dropout(dropout),
            sn(nn.Linear(2 * width * 16 + 4 * width, 8 * width)),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            sn(nn.Linear(8 * width, 1)),
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.joint(torch.cat([self.x(x), self.z(z)], 1)).squeeze(1)


class BiganModule(_Base):
    """BiGAN (Donahue et al. 2017) around a nic-cnn encoder E: a generator G (the mirrored
    decoder) maps z ~ N(0, I) to images, a discriminator D tells (x, E(x)) from (G(z), z).

    Stabilising recipe: Adam lr 2e-4, betas (0.5, 0.999) for D and for E+G; the
    non-saturating loss; spectral norm and dropout 0.2 in D; one-sided label smoothing
    (real target 0.9); instance noise: Gaussian noise of sd ``instance_noise`` (in the
    images' [-1, 1] units) added to every image D sees, real or generated, in both steps,
    decreasing linearly to 0 at the middle of the run, none after (:meth:`noise_sd`).  Logs
    ``train_d_loss``, ``train_g_loss`` and, in validation, ``val_recon`` (squared error of
    G(E(x)) per pixel, a sign of a consistent E and G).
    """

    def __init__(
        self,
        encoder: nn.Module,
        code_size: int,
        patch_size: int,
        lr: float = 2e-4,
        augment: AugmentConfig = AugmentConfig(),
        seed: int | None = 0,
        smooth: float = 0.9,
        upsample: str = "transposed",
        instance_noise: float = 0.2,
    ) -> None:
        super().__init__(encoder, lr, augment, seed)
        sides = _mirror_sides(encoder, patch_size)
        self.generator = Decoder(code_size, encoder.feature_shape[0], sides, upsample)
        self.discriminator = _Discriminator(code_size, width=max(4, encoder.feature_shape[0] // 2))
        self.code_size, self.smooth = int(code_size), float(smooth)
        self.instance_noise = float(instance_noise)
        self.automatic_optimization = False
        self.save_hyperparameters(
            {"lr": lr, "code_size": code_size, "smooth": smooth, "instance_noise": instance_noise}
        )
        self.register_buffer("_z_fixed", torch.randn(8, code_size, generator=torch.Generator().manual_seed(0)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt_d, opt_g = self.optimizers()  # type: ignore[misc]
        x = self._inputs(batch, True)
        real = self._target(x)
        n = x.shape[0]
        z = torch.randn(n, self.code_size, device=x.device)
        z_hat = self.encoder(x)
        fake = self.generator(z)
        ones, zeros = torch.full((n,), self.smooth, device=x.device), torch.zeros(n, device=x.device)
        sd = self.noise_sd()
        if sd > 0:  # D sees noisy images: its two distributions overlap, its gradients stay informative
            real = real + sd * torch.randn_like(real)
            fake = fake + sd * torch.randn_like(fake)
        # discriminator step
        d_real = self.discriminator(real, z_hat.detach())
        d_fake = self.discriminator(fake.detach(), z)
        d_loss = F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        # encoder + generator step (labels swapped, non-saturating)
        g_loss = F.binary_cross_entropy_with_logits(
            self.discriminator(real, z_hat), torch.zeros(n, device=x.device)
        ) + F.binary_cross_entropy_with_logits(self.discriminator(fake, z), torch.ones(n, device=x.device))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log("train_d_loss", d_loss, prog_bar=True, batch_size=n)
        self.log("train_g_loss", g_loss, prog_bar=True, batch_size=n)
        self.log("train_loss", d_loss + g_loss, batch_size=n)
        return d_loss + g_loss

    def noise_sd(self) -> float:
        """The instance noise's sd for this batch: ``instance_noise`` at the first, falling
        linearly to 0 at the middle of the run, 0 after (constant without a trainer)."""
        if self.instance_noise <= 0:
            return 0.0
        trainer = self._trainer
        if trainer is None:
            return self.instance_noise
        batches = max(1, int(trainer.estimated_stepping_batches))
        # global_step counts optimizer steps, two per batch (D, then E and G): 1 at mid-run
        return self.instance_noise * max(0.0, 1.0 - self.global_step / batches)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._inputs(batch, False)
        rec = (self.generator(self.encoder(x)) - self._target(x)).square().mean()
        self.log("val_recon", rec, prog_bar=True, batch_size=x.shape[0], on_epoch=True, on_step=False, sync_dist=True)

    def configure_optimizers(self) -> Any:
        betas = (0.5, 0.999)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=betas)
        ge = list(self.encoder.parameters()) + list(self.generator.parameters())
        opt_g = torch.optim.Adam(ge, lr=self.lr, betas=betas)
        return [opt_d, opt_g]

    @torch.no_grad()
    def preview(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Rows: samples G(z) of 8 fixed codes, the pooled inputs, their reconstructions G(E(x))."""
        x = self._inputs(images, False)
        n = min(x.shape[0], self._z_fixed.shape[0])
        samples = self.generator(self._z_fixed[:n])
        return [(samples + 1) / 2, (self._target(x[:n]) + 1) / 2, (self.generator(self.encoder(x[:n])) + 1) / 2]
