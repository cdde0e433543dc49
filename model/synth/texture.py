"""Natural-image textures for SynthTalk faces: photographs shipped with scikit-image (`skimage.data`).

A `Texture` is a window onto one photograph, placed in face units (position, scale, rotation), so the clothes, skin
and hair it covers move with the head, and it is sampled the same way at any image size: before sampling, the
photograph is low-passed to the render's pixel size (no aliasing at 64x64, full detail at 256x256). The background
samples it in image units and adds a defocus blur, as a portrait lens would.

`skimage.data.astronaut()` is not in the pool: it is the real photo that evaluation keeps for itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Photographs for backgrounds and prints (colour or grey), and grey detail for fabric, skin and hair.
SCENES = (
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "camera",
    "moon",
    "coins",
    "brick",
)
FABRICS = ("brick", "grass", "gravel", "coins", "camera", "moon")
FINE = ("gravel",)  # skin: small, even grain
STRANDS = ("grass",)  # hair: thin bright and dark lines
_MAX_SIDE = 512  # photographs are kept at most this large (memory; finer detail is never sampled)


@functools.cache
def photograph(name: str) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1] of a `skimage.data` photograph, at most `_MAX_SIDE` pixels on a side."""
    import skimage.data

    if name == "astronaut":
        raise ValueError("the astronaut is held out for evaluation: it is never a SynthTalk texture")
    from PIL import Image

    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity): the left view
    image = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    factor = max(image.size) / _MAX_SIDE
    if factor > 1:
        image = image.resize((round(image.width / factor), round(image.height / factor)), Image.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=24)  # RGB at 512x512: 3 MB each
def _filtered(name: str, sigma: float) -> np.ndarray:
    """The photograph low-passed by a Gaussian of `sigma` photo pixels (`_sigma` rounds it to a few levels)."""
    image = photograph(name)
    return image if sigma < 0.3 else ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="mirror")


@dataclass(frozen=True)
class Texture:
    """A window onto one photograph: face-unit point (0, 0) sits at (x0, y0) (fractions of the photo), one face unit
    spans `scale` photo pixels across (and `scale * stretch` along), rotated by `angle`."""

    name: str
    x0: float
    y0: float
    scale: float
    angle: float
    stretch: float = 1.0  # < 1 stretches the pattern along v (hair strands)

    @classmethod
    def draw(cls, rng: np.random.Generator, names: tuple[str, ...], scale: tuple[float, float], **kwargs) -> Texture:
        return cls(
            name=names[int(rng.integers(len(names)))],
            x0=float(rng.uniform(0.2, 0.8)),
            y0=float(rng.uniform(0.2, 0.8)),
            scale=float(rng.uniform(*scale)),
            angle=float(rng.uniform(-np.pi, np.pi)),
            **kwargs,
        )

    def sample(self, u: np.ndarray, v: np.ndarray, pixel: float, blur: float = 0.0) -> np.ndarray:
        """RGB float32 (*u.shape, 3) at face-unit coordinates; `pixel` is the render's pixel size in face units
        (the low-pass that keeps the sampling alias-free), `blur` an extra Gaussian std in face units."""
        image = _filtered(self.name, self._sigma(pixel, blur))
        coords = self._coords(u, v, image.shape)
        channels = [ndimage.map_coordinates(image[..., c], coords, order=1, mode="mirror") for c in range(3)]
        return np.stack(channels, axis=-1).reshape(*u.shape, 3).astype(np.float32)

    def detail(self, u: np.ndarray, v: np.ndarray, pixel: float) -> np.ndarray:
        """Grey detail (*u.shape, 1), zero-mean and unit std over the photograph: a pattern to modulate a colour by."""
        grey = _filtered_grey(self.name, self._sigma(pixel, 0.0))
        values = ndimage.map_coordinates(grey, self._coords(u, v, grey.shape), order=1, mode="mirror")
        return values.reshape(*u.shape, 1).astype(np.float32)

    def _sigma(self, pixel: float, blur: float) -> float:
        """The low-pass in photo pixels, rounded to a quarter octave (so a few filtered copies serve every render)."""
        sigma = float(np.hypot(0.5 * pixel, blur)) * self.scale
        return 0.0 if sigma < 0.3 else float(2 ** (round(4 * np.log2(sigma)) / 4))

    def _coords(self, u: np.ndarray, v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        h, w = shape[:2]
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        x = self.x0 * w + self.scale * (cos * u - sin * v)
        y = self.y0 * h + self.scale * self.stretch * (sin * u + cos * v)
        return np.stack([y.ravel(), x.ravel()])


@functools.lru_cache(maxsize=24)
def _filtered_grey(name: str, sigma: float) -> np.ndarray:
    """The photograph's grey, normalised to zero mean and unit std, then low-passed like `_filtered`."""
    grey = photograph(name).mean(axis=-1)
    grey = (grey - grey.mean()) / max(float(grey.std()), 1e-3)
    return grey if sigma < 0.3 else ndimage.gaussian_filter(grey, sigma, mode="mirror")
