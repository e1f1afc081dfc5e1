"""Tensors in [-1, 1] to pictures a person looks at."""

from __future__ import annotations

import torch
from PIL import Image

DISPLAY_SIZE = 256  # pixels a small model's image is enlarged to on screen


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """`[n, 3, H, W]` in [-1, 1] -> `[n, H, W, 3]` uint8."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_pil(images: torch.Tensor, scale: int = 1) -> list[Image.Image]:
    """One PIL image per row of `[n, 3, H, W]`, enlarged `scale` times with nearest-neighbour so pixels stay crisp."""
    pictures = [Image.fromarray(array.numpy()) for array in to_uint8(images)]
    if scale == 1:
        return pictures
    return [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in pictures]


def image_grid(rows: list[torch.Tensor], scale: int = 1, gap: int = 2) -> Image.Image:
    """Rows of images (`[k_i, 3, H, W]` each, rows may differ in length) tiled on white, enlarged `scale` times."""
    height, width = rows[0].shape[-2:]
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (columns * (width + gap) - gap, len(rows) * (height + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, picture in enumerate(to_pil(row)):
            canvas.paste(picture, (c * (width + gap), r * (height + gap)))
    return canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)


def to_display(images: torch.Tensor, size: int = DISPLAY_SIZE) -> list[Image.Image]:
    """`to_pil`, enlarged by the largest whole factor that keeps the side within `size` pixels (never shrunk)."""
    return to_pil(images, scale=max(1, size // images.shape[-1]))
