"""Portrait images: decode PNG/JPEG (any PIL format), RGB, then fit to the model's frame.

Two fits (the preset's `video.portrait_fit`): "crop", centre-crop to the target aspect then a Lanczos resize (this
project's models); "cover", OmniAvatar's and LiveTalk's resize-and-pad: a bilinear (antialiased) resize by the larger
of the two scale ratios, so the image covers the frame, then the overflow centre-cropped.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import InputError
from model.media._ffmpeg import check_input_file


def center_crop_box(src_w: int, src_h: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The largest centred (left, top, right, bottom) box of aspect width:height inside a src_w x src_h image."""
    if src_w * height > src_h * width:  # source is wider: cut the sides
        crop_w, crop_h = max(1, round(src_h * width / height)), src_h
    else:  # source is taller: cut top and bottom
        crop_w, crop_h = src_w, max(1, round(src_w * height / width))
    left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def cover_resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (height, width, 3): scale by max(height / h, width / w) (sizes truncated, as the
    reference's int()), bilinear with antialiasing on [0, 1] floats, then centre-crop (its negative padding)."""
    import torch

    h, w = rgb.shape[:2]
    ratio = max(height / h, width / w)
    scaled_h, scaled_w = max(height, int(h * ratio)), max(width, int(w * ratio))
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255.0
    image = torch.nn.functional.interpolate(
        image, size=(scaled_h, scaled_w), mode="bilinear", align_corners=False, antialias=True
    )
    top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
    image = image[0, :, top : top + height, left : left + width]
    return (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy().copy()


def load_portrait(path: str | os.PathLike, height: int, width: int, fit: str = "crop") -> np.ndarray:
    """Decode an image file to uint8 (height, width, 3) RGB, fitted to the frame ("crop" or "cover", see above)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    path = check_input_file(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)  # camera photos store their rotation in EXIF
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise InputError(path, "not an image (PIL cannot identify the file format)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncated/corrupt data as these
        raise InputError(path, f"corrupt or truncated image: {err}") from None
    if fit == "cover":
        return cover_resize(np.asarray(rgb, dtype=np.uint8), height, width)
    if fit != "crop":
        raise ValueError(f"unknown portrait fit {fit!r}; want 'crop' or 'cover'")
    box = center_crop_box(rgb.width, rgb.height, height, width)
    # Crop first: resizing with box= would let the filter read pixels outside the crop.
    resized = rgb.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8).copy()
