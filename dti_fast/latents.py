"""The latent cache: every training crop goes through the frozen VAE once, not every step.

The paper's augmentation is "shorter side resized to the resolution, a random
square crop". The uncached path encodes each sampled crop every step: a VAE
forward per sample, about as costly as the UNet step itself. The cache keeps
the augmentation and the exact latents by encoding a fixed set of crops once:

* crop offsets lie on the 8-pixel grid along the image's longer side (the
  shorter side equals the resolution, so there is nothing to choose there);
* when an image has more grid offsets than ``max_crops`` (default 16), that
  many evenly spaced offsets are kept, both ends included;
* each crop is encoded on its own, as the uncached path would, and the cache
  holds the posterior's mean and std, so every step still draws fresh latent
  noise ``mean + std * eps``.

Why not encode the whole image once and cut crops from its latents: the SD
and SDXL VAEs have self-attention in their encoder's middle block, so every
latent cell sees the whole input; a cell cut from the full image's latents is
not the cell of the crop's encoding. Cached crops are the crops' own encodings.

Memory: per crop ``2 * 4 * (resolution/8)^2`` values in the VAE's dtype
(64 KiB at 512 px in bf16; 256 KiB at 1024 px). ``latent_cache=False`` keeps
per-step encoding with any pixel offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import ConceptImages

__all__ = ["LatentCache"]


class LatentCache:
    """Per concept, per image: the VAE posteriors ``(mean, std)`` of a fixed set of crops, on the device.

    Args:
        vae: the frozen ``AutoencoderKL``.
        images: the job's concepts' images (uint8 HWC, shorter side = resolution).
        resolution: the training crop size in pixels (a multiple of ``factor``).
        factor: pixels per latent cell (8): crop offsets are multiples of it.
        device, dtype: where and in which dtype the VAE runs (the cache keeps its output dtype).
        max_crops: most crops kept per image (evenly spaced grid offsets).
        encode_batch: crops per VAE forward while filling the cache.
        encode: ``pixels -> (mean, std)`` of the posterior (default: ``vae.encode(pixels).latent_dist``);
            a family's :meth:`~dti_fast.families.Family.posterior` (SANA's DC-AE is deterministic:
            std 0; Wan encodes each crop as a one-frame video: latents (C, 1, h, w)).
    """

    def __init__(
        self,
        vae,
        images: Sequence[ConceptImages],
        resolution: int,
        factor: int,
        device: torch.device,
        dtype: torch.dtype,
        max_crops: int = 16,
        encode_batch: int = 8,
        encode=None,
    ) -> None:
        if resolution % factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
        if max_crops < 1:
            raise ValueError(f"max_crops must be at least 1, got {max_crops}")
        # per concept, per image: offsets [(top, left)], means (K, C, h, w), stds (K, C, h, w)
        self.offsets: list[list[list[tuple[int, int]]]] = []
        self.means: list[list[torch.Tensor]] = []
        self.stds: list[list[torch.Tensor]] = []
        if encode is None:

            def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                dist = vae.encode(pixels).latent_dist
                return dist.mean, dist.std

        with torch.no_grad():
            for data in images:
                offs, means, stds = [], [], []
                for array in data.arrays:
                    crops = self.grid(array.shape[0], array.shape[1], resolution, factor, max_crops)
                    m, s = [], []
                    for k in range(0, len(crops), encode_batch):
                        pixels = (
                            torch.stack(
                                [
                                    torch.from_numpy(
                                        np.ascontiguousarray(array[t : t + resolution, left : left + resolution])
                                    )
                                    for t, left in crops[k : k + encode_batch]
                                ]
                            )
                            .permute(0, 3, 1, 2)
                            .float()
                            .div_(127.5)
                            .sub_(1.0)
                        )
                        mean, std = encode(pixels.to(device, dtype))
                        m.append(mean)
                        s.append(std)
                    mean, std = torch.cat(m).contiguous(), torch.cat(s).contiguous()
                    offs.append(crops)
                    means.append(mean)
                    stds.append(std)
                self.offsets.append(offs)
                self.means.append(means)
                self.stds.append(stds)

    @property
    def nbytes(self) -> int:
        """Memory the cached posteriors take."""
        return sum(t.numel() * t.element_size() for per in (self.means, self.stds) for ts in per for t in ts)

    @staticmethod
    def grid(height: int, width: int, resolution: int, factor: int, max_crops: int) -> list[tuple[int, int]]:
        """The cached crops' (top, left): 8-pixel grid offsets, at most ``max_crops`` evenly spaced ones."""

        def axis(size: int) -> list[int]:
            positions = list(range(0, size - resolution + 1, factor))
            if len(positions) > max_crops:
                picks = np.linspace(0, len(positions) - 1, max_crops).round().astype(int)
                positions = [positions[i] for i in sorted(set(picks.tolist()))]
            return positions

        return [(t, left) for t in axis(height) for left in axis(width)]

    def draw(self, concept: int, image: int, generator: torch.Generator) -> tuple[int, int, int]:
        """A random cached crop of one image: its index and (top, left) in pixels of the resized image."""
        offsets = self.offsets[concept][image]
        k = int(torch.randint(0, len(offsets), (1,), generator=generator))
        return k, offsets[k][0], offsets[k][1]

    def latents(self, refs: Sequence[tuple[int, int, int]], eps: torch.Tensor) -> torch.Tensor:
        """Posterior samples ``mean + std * eps`` of the crops ``refs`` = (concept, image, crop index).

        ``eps`` is shaped like the latents, (B, C, h, w) or Wan's (B, C, 1, h, w); the result is in
        the cache's dtype, on its device.
        """
        mean = torch.stack([self.means[c][i][k] for c, i, k in refs])
        std = torch.stack([self.stds[c][i][k] for c, i, k in refs])
        return mean + std * eps.to(mean.device, mean.dtype)
