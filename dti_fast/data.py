"""Concepts and their training images.

A concept is a name, a folder of images, initializer word(s), an optional
class noun and a placeholder token. Images are validated when the concept is
loaded (before any model work); augmentation is the paper's: shorter side
resized to the resolution, a random square crop, no flip.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "Concept",
    "ConceptImages",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "load_concept_images",
    "load_rgb",
    "normalize_pixels",
    "random_crop",
    "random_crop_uint8",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Photo formats PIL cannot decode without plug-ins: named in a warning instead of skipped silently.
UNREADABLE_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".cr2", ".nef", ".arw", ".dng", ".raw", ".psd", ".svg")
MAX_IMAGE_PIXELS = 64_000_000
"""Largest training image accepted (64 megapixels, e.g. 9800 x 6500): larger files, decompression bombs
among them, are refused by name before they are decoded."""

# The standard Textual Inversion prompt templates ("a photo of a {}" family).
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Concept:
    """One concept to learn.

    ``placeholder`` defaults to ``<name>``; ``init`` is the initializer word(s),
    whose tokenizer pieces set the number of vectors; ``kind`` picks the
    prompt templates ("object" or "style"); ``steps`` overrides the job's.
    """

    name: str
    images: Path
    init: str
    class_noun: str | None = None
    placeholder: str | None = None
    kind: str = "object"
    steps: int | None = None
    trigger: str | None = None  # the A1111/ComfyUI word and file name; default from the placeholder (concept_files)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name or ""):
            raise ValueError(
                f"concept name {self.name!r} must start with a letter or digit and hold only letters, "
                "digits, '_', '-' or '.' (it names the output folder)"
            )
        self.images = Path(self.images)
        if self.placeholder is None:
            self.placeholder = f"<{self.name}>"
        if not self.placeholder.strip() or any(c.isspace() for c in self.placeholder):
            raise ValueError(f"concept {self.name!r}: placeholder {self.placeholder!r} must be one word without spaces")
        if not (self.init or "").strip():
            raise ValueError(f"concept {self.name!r}: give initializer word(s) (init), e.g. the class noun")
        if self.kind not in ("object", "style"):
            raise ValueError(f"concept {self.name!r}: kind must be 'object' or 'style', got {self.kind!r}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"concept {self.name!r}: steps must be positive, got {self.steps}")

    @property
    def templates(self) -> Sequence[str]:
        return STYLE_TEMPLATES if self.kind == "style" else OBJECT_TEMPLATES


@dataclass
class ConceptImages:
    """A concept's decoded images: uint8 HWC arrays, resized so the shorter side is the resolution."""

    concept: Concept
    arrays: list[np.ndarray] = field(default_factory=list)
    original_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) before resizing
    files: list[Path] = field(default_factory=list)


def _too_large(path: Path, w: int, h: int) -> ValueError:
    return ValueError(
        f"image {path} is {w}x{h} px ({w * h / 1e6:.0f} megapixels), above the limit of "
        f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels; downscale it (a few megapixels is plenty for training)"
    )


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file to 8-bit RGB (EXIF orientation applied, alpha on white); ValueError naming the file.

    The size is checked from the header first: files above :data:`MAX_IMAGE_PIXELS` are never decoded.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise _too_large(path, w, h)
            im.load()  # decode fully now: a truncated file fails here, not mid-training
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grey: scale to 8 bits instead of clipping.
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                return Image.fromarray((arr / top * 255.0).round().astype(np.uint8)).convert("RGB")
            return im.convert("RGB")
    except Image.DecompressionBombError:
        raise ValueError(
            f"image {path} declares more pixels than PIL will decode (a decompression bomb or a "
            f"huge scan); the limit here is {MAX_IMAGE_PIXELS // 1_000_000} megapixels: downscale it or "
            "remove it"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if str(err).startswith(f"image {path} is "):
            raise
        raise ValueError(
            f"image {path} could not be read ({err}); remove or replace the file (supported: "
            f"{', '.join(IMAGE_SUFFIXES)})"
        ) from err


def load_concept_images(concept: Concept, resolution: int) -> ConceptImages:
    """Load and validate every image of ``concept``; resize the shorter side to ``resolution``.

    EXIF orientation is applied; alpha is composited on white; palette, CMYK,
    greyscale and 16-bit images are converted to 8-bit RGB. Images whose shorter
    side is below ``resolution`` are refused (upscaling would train on blur).

    Raises ``FileNotFoundError``/``ValueError`` naming the folder or file and the fix.
    """
    folder = concept.images
    if not folder.exists():
        raise FileNotFoundError(f"concept {concept.name!r}: image folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise ValueError(f"concept {concept.name!r}: {folder} is not a folder; point 'images' at a folder of images")
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    unreadable = [p.name for p in entries if p.suffix.lower() in UNREADABLE_SUFFIXES]
    if unreadable and files:
        print(
            f"dti-fast: warning: concept {concept.name!r}: skipping {len(unreadable)} file(s) in a format PIL "
            f"cannot read ({', '.join(unreadable[:5])}); convert them to JPEG or PNG to use them",
            file=sys.stderr,
        )
    if not files:
        nested = sorted(
            {
                p.parent.relative_to(folder).as_posix()
                for p in folder.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.parent != folder
            }
        )
        others = ", ".join(p.name for p in entries[:5])
        if nested:
            hint = (
                f"; the photos are in sub-folder(s) {', '.join(nested[:5])}: point 'images' at the folder "
                "that holds them"
            )
        elif unreadable:
            hint = f"; found only formats PIL cannot read ({', '.join(unreadable[:5])}): convert them to JPEG or PNG"
        elif others:
            hint = f"; found only: {others}"
        else:
            hint = "; the folder is empty"
        raise ValueError(
            f"concept {concept.name!r}: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}"
            + hint
            + "); add the concept's photos there"
        )
    out = ConceptImages(concept)
    for path in files:
        img = load_rgb(path)
        w, h = img.size
        if min(w, h) < resolution:
            raise ValueError(
                f"image {path} is {w}x{h} px, smaller than the training resolution {resolution}; "
                "use a larger image or a lower --resolution"
            )
        scale = resolution / min(w, h)
        new_size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        img = img.resize(new_size, Image.Resampling.BICUBIC)
        out.arrays.append(np.array(img, dtype=np.uint8))
        out.original_sizes.append((h, w))
        out.files.append(path)
    return out


def random_crop_uint8(
    array: np.ndarray, resolution: int, generator: torch.Generator
) -> tuple[torch.Tensor, tuple[int, int]]:
    """A random ``resolution`` square crop of an HWC uint8 array as a CHW uint8 tensor, and its (top, left).

    The trainer sends these 8-bit pixels to the device (a quarter of the bytes of fp32) and normalises
    there with :func:`normalize_pixels`.
    """
    h, w = array.shape[:2]
    top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    crop = array[top : top + resolution, left : left + resolution]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1), (top, left)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape, any device) as fp32 in [-1, 1]: ``x / 127.5 - 1``, the same on every device."""
    return pixels.float().div_(127.5).sub_(1.0)


def random_crop(array: np.ndarray, resolution: int, generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """A random ``resolution`` square crop of an HWC uint8 array as a CHW float tensor in [-1, 1].

    Returns the tensor and the crop's (top, left).
    """
    crop, where = random_crop_uint8(array, resolution, generator)
    return normalize_pixels(crop), where
