"""dti_fast.data: concepts, image formats, size limits, folders, crops."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dti_fast.data import (
    MAX_IMAGE_PIXELS,
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    Concept,
    load_concept_images,
    load_rgb,
    normalize_pixels,
    random_crop,
    random_crop_uint8,
)


def _photo(path: Path, size=(80, 64), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (its data is a few bytes): a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".bmp", ".gif", ".tif", ".tiff"])
def test_every_format_pil_reads_is_accepted(tmp_path, suffix):
    _photo(tmp_path / "c" / f"a{suffix}")
    got = load_concept_images(Concept("c", tmp_path / "c", "dog"), 64)
    assert len(got.arrays) == 1 and got.arrays[0].shape == (64, 80, 3) and got.arrays[0].dtype == np.uint8


def test_unreadable_formats_are_named_in_a_warning(tmp_path, capsys):
    _photo(tmp_path / "c" / "a.jpg")
    (tmp_path / "c" / "b.heic").write_bytes(b"\x00" * 32)
    got = load_concept_images(Concept("c", tmp_path / "c", "dog"), 64)
    assert len(got.arrays) == 1
    assert "b.heic" in capsys.readouterr().err


def test_only_unreadable_formats_say_so(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "b.heic").write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match="formats PIL cannot read.*b.heic.*convert"):
        load_concept_images(Concept("c", tmp_path / "c", "dog"), 64)


def test_photos_in_sub_folders_are_pointed_to(tmp_path):
    _photo(tmp_path / "c" / "2024" / "a.jpg")
    with pytest.raises(ValueError, match="sub-folder.*2024"):
        load_concept_images(Concept("c", tmp_path / "c", "dog"), 64)


def test_a_decompression_bomb_is_refused_by_name_before_decoding(tmp_path):
    (tmp_path / "c").mkdir()
    bomb = _png_declaring(tmp_path / "c" / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 1000
    with pytest.raises(ValueError, match="bomb.png.*megapixels"):
        load_rgb(bomb)
    with pytest.raises(ValueError, match="bomb.png"):
        load_concept_images(Concept("c", tmp_path / "c", "dog"), 64)


def test_an_image_just_above_the_limit_is_refused_from_its_header(tmp_path):
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    big = _png_declaring(tmp_path / "big.png", side, side)
    with pytest.raises(ValueError, match=f"{side}x{side} px.*above the limit"):
        load_rgb(big)


def test_small_images_are_refused_with_the_fix(tmp_path):
    _photo(tmp_path / "c" / "a.png", size=(40, 40))
    with pytest.raises(ValueError, match="smaller than the training resolution 64.*--resolution"):
        load_concept_images(Concept("c", tmp_path / "c", "dog"), 64)


def test_concept_defaults_and_checks(tmp_path):
    c = Concept("dog", tmp_path, "dog")
    assert c.placeholder == "<dog>" and c.templates == OBJECT_TEMPLATES
    assert Concept("s", tmp_path, "painting", kind="style").templates == STYLE_TEMPLATES
    for bad in ({"name": "../x"}, {"init": " "}, {"kind": "scene"}, {"steps": 0}, {"placeholder": "a b"}):
        kw = {"name": "dog", "images": tmp_path, "init": "dog", **bad}
        with pytest.raises(ValueError):
            Concept(**kw)


def test_random_crop_is_seeded_and_in_range():
    arr = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    a, pos_a = random_crop(arr, 64, torch.Generator().manual_seed(3))
    b, pos_b = random_crop(arr, 64, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and pos_a == pos_b
    top, left = pos_a
    assert a.shape == (3, 64, 64) and float(a.min()) >= -1 and float(a.max()) <= 1
    expected = torch.from_numpy(arr[top : top + 64, left : left + 64].copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(a, expected)


def test_uint8_crops_normalised_later_equal_the_float_crops_bit_for_bit():
    """Issue 11 item 8: the trainer sends uint8 crops and normalises on the device; same tensor, same draws."""
    arr = np.random.default_rng(1).integers(0, 256, (64, 100, 3), dtype=np.uint8)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    floats, raws = [], []
    for _ in range(4):
        f, pos_f = random_crop(arr, 64, gen_a)
        u, pos_u = random_crop_uint8(arr, 64, gen_b)
        assert pos_f == pos_u and u.dtype == torch.uint8 and u.shape == (3, 64, 64)
        floats.append(f)
        raws.append(u)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())  # the same random draws
    # The previous trainer path: x.float().div_(127.5).sub_(1.0) per crop on the CPU, then stacked.
    before = torch.stack([r.float().div_(127.5).sub_(1.0) for r in raws])
    batched = normalize_pixels(torch.stack(raws))
    assert batched.dtype == torch.float32
    assert torch.equal(batched, before) and torch.equal(batched, torch.stack(floats))
    assert float(normalize_pixels(torch.tensor([0, 255], dtype=torch.uint8))[0]) == -1.0
