"""``RandomHorizontalFlip`` for PIL images, with torchvision's semantics.

The image is mirrored left to right when ``torch.rand(1) < p``: one draw from
torch's global generator per call, as torchvision draws it, so a seeded run
flips the same images. Only PIL images are accepted (the example passes PIL).
"""

from __future__ import annotations

import torch
from PIL import Image

__all__ = ["RandomHorizontalFlip"]


class RandomHorizontalFlip(torch.nn.Module):
    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"this torchvision stand-in flips PIL images only, got {type(img).__name__}")
        if torch.rand(1) < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"
