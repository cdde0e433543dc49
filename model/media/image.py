"""Portrait images: decode PNG, JPEG or WebP to RGB, then fit to the model's frame.

Two fits (the preset's `video.portrait_fit`): "crop", centre-crop to the target aspect then a Lanczos resize (this
project's models); "cover", OmniAvatar's and LiveTalk's resize-and-pad: a bilinear (antialiased) resize by the larger
of the two scale ratios, so the image covers the frame, then the overflow centre-cropped.

The image's size is read from its header and checked before any pixel is decoded: a small file that claims a huge
image (a decompression bomb) is refused without allocating it, and so is one too small to hold a face.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import InputError
from model.media._ffmpeg import check_input_file

PORTRAIT_FORMATS = ("PNG", "JPEG", "WEBP")  # the documented ones; PIL is told to try no other decoder
MAX_PORTRAIT_PIXELS = 40_000_000  # width x height (a 24-megapixel camera photo fits)
MIN_PORTRAIT_SIDE = 32  # px


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


def load_portrait(
    path: str | os.PathLike,
    height: int,
    width: int,
    fit: str = "crop",
    max_pixels: int = MAX_PORTRAIT_PIXELS,
    min_side: int = MIN_PORTRAIT_SIDE,
) -> np.ndarray:
    """Decode an image file to uint8 (height, width, 3) RGB, fitted to the frame ("crop" or "cover", see above).

    Raises InputError (naming the file) for a missing, empty, unsupported, corrupt, too large (over
    `max_pixels`) or too small (a side under `min_side`) image.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    return fit_image(load_image(path, max_pixels, min_side), height, width, fit)


def load_image(
    path: str | os.PathLike, max_pixels: int = MAX_PORTRAIT_PIXELS, min_side: int = MIN_PORTRAIT_SIDE
) -> Image.Image:
    """Decode an image file to an RGB image at its own size, upright; the checks and errors of `load_portrait`."""
    path = check_input_file(path)
    try:
        with Image.open(path, formats=PORTRAIT_FORMATS) as img:
            src_w, src_h = img.size  # from the header: nothing decoded yet
            if src_w * src_h > max_pixels:
                raise InputError(path, f"image is {src_w}x{src_h} pixels, over the limit of {max_pixels} pixels")
            if min(src_w, src_h) < min_side:
                raise InputError(
                    path, f"image is {src_w}x{src_h} pixels; a portrait needs at least {min_side} px on each side"
                )
            img.load()  # decode now: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)  # camera photos store their rotation in EXIF
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise InputError(path, "not an image in a supported format (PNG, JPEG, WebP)") from None
    except Image.DecompressionBombError as err:  # PIL's own cap, should a caller raise max_pixels past it
        raise InputError(path, f"image too large to decode: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncated/corrupt data as these
        if isinstance(err, InputError):
            raise
        raise InputError(path, f"corrupt or truncated image: {err}") from None
    return rgb


def fit_image(image: Image.Image, height: int, width: int, fit: str = "crop") -> np.ndarray:
    """An RGB image -> uint8 (height, width, 3) by one of the two fits (above): a portrait, or a frame of a video
    compared with a render of another size."""
    if fit == "cover":
        return cover_resize(np.asarray(image, dtype=np.uint8), height, width)
    if fit != "crop":
        raise ValueError(f"unknown portrait fit {fit!r}; want 'crop' or 'cover'")
    box = center_crop_box(image.width, image.height, height, width)
    # Crop first: resizing with box= would let the filter read pixels outside the crop.
    resized = image.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8).copy()
