"""dti_fast.latents: the crop grid, and cached posteriors equal to encoding each crop (tiny real VAE)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dti_fast.data import Concept, ConceptImages
from dti_fast.latents import LatentCache

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae():
    from dti_fast.testing.tiny import TINY_VAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return diffusers.AutoencoderKL(**TINY_VAE).eval()


def _images(shapes) -> ConceptImages:
    rng = np.random.default_rng(0)
    data = ConceptImages(Concept("c", Path("."), "dog"))
    for h, w in shapes:
        data.arrays.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        data.original_sizes.append((h, w))
    return data


def test_grid_is_on_the_vae_factor_and_evenly_thinned():
    assert LatentCache.grid(64, 64, 64, 8, 16) == [(0, 0)]
    assert LatentCache.grid(64, 96, 64, 8, 16) == [(0, left) for left in range(0, 33, 8)]
    thinned = LatentCache.grid(64, 256, 64, 8, 4)
    assert [left for _, left in thinned] == [0, 64, 128, 192] and all(left % 8 == 0 for _, left in thinned)


def test_cached_posteriors_equal_each_crops_own_encoding(vae):
    data = _images([(64, 80), (72, 64)])
    cache = LatentCache(vae, [data], 64, 8, torch.device("cpu"), torch.float32, max_crops=16, encode_batch=2)
    for i, array in enumerate(data.arrays):
        for k, (top, left) in enumerate(cache.offsets[0][i]):
            crop = torch.from_numpy(array[top : top + 64, left : left + 64].copy()).permute(2, 0, 1).float() / 127.5 - 1
            with torch.no_grad():
                dist = vae.encode(crop[None]).latent_dist
            torch.testing.assert_close(cache.means[0][i][k], dist.mean[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.stds[0][i][k], dist.std[0], atol=1e-5, rtol=1e-5)
    assert cache.nbytes == sum(t.numel() * 4 for ts in (cache.means[0], cache.stds[0]) for t in ts)


def test_draw_and_sample_use_the_generator_and_the_noise(vae):
    cache = LatentCache(vae, [_images([(64, 96)])], 64, 8, torch.device("cpu"), torch.float32)
    a = cache.draw(0, 0, torch.Generator().manual_seed(1))
    assert a == cache.draw(0, 0, torch.Generator().manual_seed(1))
    k = a[0]
    assert (a[1], a[2]) == cache.offsets[0][0][k]
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    got = cache.latents([(0, 0, k), (0, 0, 0)], eps)
    torch.testing.assert_close(got[0], cache.means[0][0][k] + cache.stds[0][0][k] * eps[0])
    torch.testing.assert_close(got[1], cache.means[0][0][0] + cache.stds[0][0][0] * eps[1])


def test_bad_arguments_are_refused(vae):
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        LatentCache(vae, [], 60, 8, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="max_crops"):
        LatentCache(vae, [], 64, 8, torch.device("cpu"), torch.float32, max_crops=0)
