"""Procedural faces: identities from seeds, idle head motion and blinks, and a numpy renderer.

All geometry lives in "face units": lengths are fractions of the image height, so one identity renders
identically (up to resolution) at any size. Every shape is an anti-aliased (super)ellipse: coverage of a
pixel is its approximate signed distance to the shape's edge, clipped to one pixel, so the mouth's pixel
area changes continuously with its opening even at 64x64. Frames are rendered as one batch of arrays.

Surfaces carry natural-image texture (`model.synth.texture`, photographs from `skimage.data`): a defocused photo
behind the head, fabric or a print on the clothes, fine grain on the skin, strands in the hair (whose edge is
wispy). Face-attached textures are sampled in face units, so they move with the head. The open mouth shows the
upper teeth over the top quarter of its gap, and each pupil a catchlight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from model.synth.texture import FABRICS, FINE, SCENES, STRANDS, Texture

_IDENTITY_STREAM = 10
_MOTION_STREAM = 11
POSE_PARAMS = ("dx", "dy", "roll", "scale")

_SKIN_TONES = np.array(  # light to dark; an identity interpolates between neighbours
    [[0.96, 0.82, 0.72], [0.90, 0.72, 0.58], [0.80, 0.60, 0.45], [0.66, 0.47, 0.34], [0.52, 0.36, 0.26]]
)
_HAIR_COLOURS = np.array(
    [
        [0.08, 0.06, 0.05],
        [0.30, 0.18, 0.10],
        [0.55, 0.35, 0.18],
        [0.85, 0.70, 0.40],
        [0.60, 0.25, 0.10],
        [0.70, 0.70, 0.72],
    ]
)
_IRIS_COLOURS = np.array([[0.25, 0.15, 0.08], [0.20, 0.35, 0.55], [0.25, 0.45, 0.30], [0.45, 0.35, 0.20]])
_MOUTH_INSIDE = np.array([0.12, 0.03, 0.04])  # near-black: the metric finds the open mouth by darkness
_EYE_WHITE = np.array([0.95, 0.95, 0.93])
_PUPIL = np.array([0.03, 0.03, 0.03])
_TEETH_FRACTION = 0.25  # of the mouth's gap, from its top


@dataclass(frozen=True)
class Identity:
    """Everything that makes one face look like itself (face units, RGB in [0, 1])."""

    centre: tuple[float, float]
    face_half: tuple[float, float]  # half width, half height
    face_power: float  # 2 = ellipse, larger = squarer jaw
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_scale: tuple[float, float]  # hair cap relative to the face
    hairline: float  # y (relative to face centre) above which the forehead is hair; -1 = bald
    eye_y: float
    eye_dx: float
    eye_half: tuple[float, float]
    iris: tuple[float, float, float]
    brow_thickness: float
    nose_y: float
    mouth_y: float  # upper lip line
    mouth_half_width: float  # at rest
    lip_thickness: float
    lip: tuple[float, float, float]
    max_gap: float  # full height of the open mouth at opening 1
    clothes: tuple[float, float, float]
    background: tuple[tuple[float, float, float], tuple[float, float, float]]
    background_angle: float
    # Natural-image texture (drawn after everything above, so a seed's geometry and colours are unchanged by it).
    background_photo: Texture  # in image units, centred
    background_mix: float  # how much of the background is the photo (the rest: the gradient)
    background_blur: float  # defocus, Gaussian std in face units
    clothes_texture: Texture
    clothes_print: bool  # a colour print on the clothes (else a grey fabric pattern tinting `clothes`)
    clothes_contrast: float
    skin_texture: Texture
    skin_contrast: float
    hair_texture: Texture  # strands: stretched along v
    hair_contrast: float
    hair_wisp: float  # relative depth of the hair edge's irregularity
    teeth: tuple[float, float, float]

    @classmethod
    def from_seed(cls, seed: int) -> Identity:
        rng = np.random.default_rng([seed, _IDENTITY_STREAM])
        u = rng.uniform
        a = u(0.22, 0.27)
        b = a * u(1.2, 1.35)
        tone = u(0, len(_SKIN_TONES) - 1)
        lo = int(tone)
        skin = _SKIN_TONES[lo] + (tone - lo) * (_SKIN_TONES[min(lo + 1, len(_SKIN_TONES) - 1)] - _SKIN_TONES[lo])
        skin = np.clip(skin * u(0.95, 1.05, 3), 0, 1)
        hair = np.clip(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * u(0.85, 1.15), 0, 1)
        eye_half_w = a * u(0.15, 0.2)
        mouth_y = b * u(0.38, 0.44)
        # Backgrounds stay brighter than the open mouth so the mouth's darkness is its own.
        bg = [np.clip(rng.uniform(0.3, 0.95, 3), 0, 1) for _ in range(2)]
        return cls(
            centre=(0.5 + u(-0.02, 0.02), 0.47 + u(-0.02, 0.02)),
            face_half=(a, b),
            face_power=u(2.0, 2.6),
            skin=tuple(skin),
            hair=tuple(hair),
            hair_scale=(u(1.05, 1.2), u(1.05, 1.15)),
            hairline=-1.0 if rng.random() < 0.1 else b * u(-0.7, -0.45),
            eye_y=-b * u(0.05, 0.15),
            eye_dx=a * u(0.38, 0.46),
            eye_half=(eye_half_w, eye_half_w * u(0.55, 0.75)),
            iris=tuple(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))]),
            brow_thickness=b * u(0.025, 0.05),
            nose_y=b * u(0.15, 0.22),
            mouth_y=mouth_y,
            mouth_half_width=a * u(0.28, 0.36),
            lip_thickness=b * u(0.035, 0.05),
            lip=tuple(np.clip(skin * np.array([0.85, 0.55, 0.55]) * u(0.95, 1.05), 0, 1)),
            max_gap=b * u(0.3, 0.36),
            clothes=tuple(rng.uniform(0.1, 0.9, 3)),
            background=(tuple(bg[0]), tuple(bg[1])),
            background_angle=u(0, 2 * np.pi),
            **_texture_fields(rng),
        )

    def to_json(self) -> dict:
        return asdict(self)


def _texture_fields(rng: np.random.Generator) -> dict:
    """The texture half of an identity. Scales are photo pixels per face unit (the image height): at 128x128 one
    image pixel spans 1.2-4 photo pixels, so patterns are a few pixels across."""
    u = rng.uniform
    clothes_print = bool(rng.random() < 0.3)
    return dict(
        background_photo=Texture.draw(rng, SCENES, (150.0, 450.0)),
        background_mix=u(0.6, 1.0),
        background_blur=u(0.004, 0.02),
        clothes_texture=Texture.draw(rng, SCENES if clothes_print else FABRICS, (200.0, 500.0)),
        clothes_print=clothes_print,
        clothes_contrast=u(0.15, 0.45),
        skin_texture=Texture.draw(rng, FINE, (400.0, 700.0)),
        skin_contrast=u(0.01, 0.03),
        hair_texture=Texture.draw(rng, STRANDS, (400.0, 700.0), stretch=u(0.15, 0.35)),
        hair_contrast=u(0.1, 0.25),
        hair_wisp=u(0.01, 0.04),
        teeth=tuple(np.clip(np.array([0.93, 0.91, 0.84]) * u(0.85, 1.0), 0, 1)),
    )


def idle_motion(seed: int, num_frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Head pose (N, 4: dx, dy, roll radians, scale) and blink closure (N,) in [0, 1], independent of audio."""
    rng = np.random.default_rng([seed, _MOTION_STREAM])
    t = np.arange(num_frames) / fps
    amplitude = np.array([0.012, 0.008, 0.04, 0.015])  # face units, face units, radians, relative
    pose = np.zeros((num_frames, 4))
    for j in range(4):  # a few slow sinusoids per axis: smooth, aperiodic-looking sway
        for _ in range(3):
            freq, phase = rng.uniform(0.05, 0.35), rng.uniform(0, 2 * np.pi)
            pose[:, j] += amplitude[j] / 2 * np.sin(2 * np.pi * freq * t + phase)
    pose[:, 3] += 1.0

    blink = np.zeros(num_frames)
    blink_seconds = 0.3
    half = blink_seconds * fps / 2
    t_blink = rng.uniform(0.5, 3.0)
    while t_blink * fps < num_frames + half:
        closeness = 1 - np.abs(np.arange(num_frames) - t_blink * fps) / half
        blink = np.maximum(blink, np.sin(np.pi / 2 * np.clip(closeness, 0, 1)) ** 2)
        t_blink += rng.uniform(2.0, 6.0)
    return pose.astype(np.float32), blink.astype(np.float32)


def _coverage(u, v, cx, cy, a, b, pixel, power=2.0):
    """Anti-aliased coverage of a superellipse centred (cx, cy) with half axes (a, b)."""
    x, y = np.abs(u - cx) / a, np.abs(v - cy) / b
    x, y = np.maximum(x, 1e-6), np.maximum(y, 1e-6)
    if power == 2.0:
        q = np.sqrt(x * x + y * y)
        gx, gy = x / (a * q), y / (b * q)
    else:
        q = (x**power + y**power) ** (1 / power)
        scale = q ** (1 - power)
        gx, gy = x ** (power - 1) * scale / a, y ** (power - 1) * scale / b
    distance = (q - 1) / np.sqrt(gx * gx + gy * gy)  # first-order signed distance to the edge
    # A shape thinner than a pixel covers only part of it: scale by its extent so coverage -> 0 with it.
    thin = np.clip(2 * a / pixel, 0, 1) * np.clip(2 * b / pixel, 0, 1)
    return np.clip(0.5 - distance / pixel, 0.0, 1.0) * thin


@dataclass(frozen=True)
class Framing:
    """Where the camera puts the head: `zoom` scales it about its centre, (dx, dy) moves it (fractions of the image
    height). The default frames every identity as its seed says; other framings (a small face high in the picture,
    as in many photos) are for training data, the background does not move with them."""

    zoom: float = 1.0
    dx: float = 0.0
    dy: float = 0.0


DEFAULT_FRAMING = Framing()


class _Canvas:
    """A batch of frames plus the face-local coordinates of their pixels; shapes paint only their bounding box."""

    def __init__(self, identity: Identity, pose: np.ndarray, height: int, width: int, framing: Framing):
        self.height, self.width = height, width
        col = lambda values: np.asarray(values, dtype=np.float32)[:, None, None]  # noqa: E731  (N,) -> (N,1,1)
        dx, dy, roll, scale = (col(pose[:, j]) for j in range(4))
        # Face-local coordinates: undo the camera, then the head's translation, roll and scale for every pixel centre.
        self.zoom = framing.zoom
        self.origin = (identity.centre[0] * width / height + framing.dx, identity.centre[1] + framing.dy)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        px = ((xs + 0.5) / height - self.origin[0])[None] / self.zoom - dx
        py = ((ys + 0.5) / height - self.origin[1])[None] / self.zoom - dy
        cos, sin = np.cos(-roll), np.sin(-roll)
        self.u = (cos * px - sin * py) / scale
        self.v = (sin * px + cos * py) / scale
        self.pixel = 1.0 / height / self.zoom / float(np.mean(pose[:, 3]))
        self.shift = float(np.abs(pose[:, :2]).max())
        self.turn = float(np.abs(pose[:, 2]).max()) + float(np.abs(pose[:, 3] - 1).max())
        background = _background(identity, height, width)
        self.image = np.repeat(background[None], len(pose), axis=0)

    def box(self, cx, cy, ha, hb) -> tuple[slice, slice]:
        """Pixel rows/cols a shape can reach under the clip's head motion (2 pixels of slack)."""
        ha, hb = float(np.max(ha)), float(np.max(hb))
        cy_lo, cy_hi = float(np.min(cy)), float(np.max(cy))
        reach = (
            self.shift
            + self.turn * float(np.hypot(abs(cx) + ha, max(abs(cy_lo), abs(cy_hi)) + hb))
            + 2 / self.height / self.zoom
        )
        z, h = self.zoom, self.height
        rows = ((self.origin[1] + z * (cy_lo - hb - reach)) * h, (self.origin[1] + z * (cy_hi + hb + reach)) * h)
        cols = ((self.origin[0] + z * (cx - ha - reach)) * h, (self.origin[0] + z * (cx + ha + reach)) * h)
        clamp = lambda lo, hi, n: slice(int(np.clip(np.floor(lo), 0, n)), int(np.clip(np.ceil(hi), 0, n)))  # noqa: E731
        return clamp(*rows, self.height), clamp(*cols, self.width)

    def cover(self, cx, cy, ha, hb, box, power=2.0):
        rows, cols = box
        return _coverage(self.u[:, rows, cols], self.v[:, rows, cols], cx, cy, ha, hb, self.pixel, power)

    def paint(self, alpha, colour, box):
        rows, cols = box
        target = self.image[:, rows, cols]
        target += alpha[..., None] * (np.asarray(colour, dtype=np.float32) - target)

    def shape(self, cx, cy, ha, hb, colour, power=2.0, texture=None, contrast=0.0):
        """A shape in a plain colour, or modulated by a texture's grey detail: colour * (1 + contrast * detail)."""
        box = self.box(cx, cy, ha, hb)
        if texture is not None:
            colour = self.textured(colour, texture, contrast, box)
        self.paint(self.cover(cx, cy, ha, hb, box, power), colour, box)

    def textured(self, colour, texture, contrast, box):
        """(N, rows, cols, 3): `colour` modulated by the texture's detail at the box's face-unit coordinates."""
        rows, cols = box
        detail = texture.detail(self.u[:, rows, cols], self.v[:, rows, cols], self.pixel)
        return np.asarray(colour, dtype=np.float32) * (1.0 + contrast * detail)


def _background(identity: Identity, height: int, width: int) -> np.ndarray:
    """A two-colour gradient mixed with a defocused photo, kept in [0.3, 0.95]: brighter than the open mouth, so the
    mouth's darkness is its own."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = np.cos(identity.background_angle) * x / width + np.sin(identity.background_angle) * y / height
    ramp = (direction - direction.min()) / (np.ptp(direction) + 1e-6)
    c0, c1 = (np.array(c, dtype=np.float32) for c in identity.background)
    gradient = c0 + ramp[..., None] * (c1 - c0)
    u, v = (x + 0.5) / height - 0.5 * width / height, (y + 0.5) / height - 0.5
    photo = 0.3 + 0.65 * identity.background_photo.sample(u, v, 1.0 / height, blur=identity.background_blur)
    return gradient + identity.background_mix * (photo - gradient)


def render(
    identity: Identity,
    pose: np.ndarray,
    mouth: np.ndarray,
    blink: np.ndarray,
    height: int = 64,
    width: int | None = None,
    framing: Framing = DEFAULT_FRAMING,
) -> np.ndarray:
    """Frames uint8 (N, H, W, 3) for per-frame pose (N, 4), mouth (N, 3: opening, width, rounding), blink (N,)."""
    width = height if width is None else width
    canvas = _Canvas(identity, pose, height, width, framing)
    col = lambda values: np.asarray(values, dtype=np.float32)[:, None, None]  # noqa: E731  (N,) -> (N,1,1)
    skin = np.array(identity.skin)
    a, b = identity.face_half

    _clothes(canvas, identity, a, b)
    skin_grain = dict(texture=identity.skin_texture, contrast=identity.skin_contrast)
    canvas.shape(0, b * 0.8, a * 0.45, b * 0.6, skin * 0.85, power=4.0, **skin_grain)  # neck
    hair_a, hair_b = a * identity.hair_scale[0], b * identity.hair_scale[1]
    bald = identity.hairline <= -1.0
    if not bald:
        _hair(canvas, identity, hair_a, hair_b)
    for side in (-1, 1):  # ears
        canvas.shape(side * a * 0.98, identity.eye_y + b * 0.1, a * 0.14, b * 0.2, skin * 0.9, **skin_grain)
    canvas.shape(0, 0, a, b, skin, power=identity.face_power, **skin_grain)
    if not bald:  # fringe: the hair cap over the forehead, above the hairline
        _hair(canvas, identity, hair_a, hair_b, fringe=True)

    eh_w, eh_h = identity.eye_half
    closed = col(blink)
    for side in (-1, 1):
        ex, ey = side * identity.eye_dx, identity.eye_y
        canvas.shape(ex, ey - eh_h * 1.6, eh_w * 1.2, identity.brow_thickness, np.array(identity.hair) * 0.8)
        box = canvas.box(ex, ey, eh_w, eh_h)
        white = canvas.cover(ex, ey, eh_w, eh_h * (1.0 - 0.95 * closed), box)
        canvas.paint(white, _EYE_WHITE, box)
        canvas.paint(white * canvas.cover(ex, ey, eh_h * 0.8, eh_h * 0.8, box), identity.iris, box)
        canvas.paint(white * canvas.cover(ex, ey, eh_h * 0.35, eh_h * 0.35, box), _PUPIL, box)
        glint = canvas.cover(ex - eh_h * 0.18, ey - eh_h * 0.2, eh_h * 0.13, eh_h * 0.13, box)
        canvas.paint(white * glint, _EYE_WHITE, box)  # the catchlight
        lid = closed * canvas.cover(ex, ey, eh_w, canvas.pixel * 0.6, box)  # the closed lid's line
        canvas.paint(lid, np.array(identity.hair) * 0.6, box)

    box = canvas.box(0, identity.nose_y, a * 0.12, b * 0.06)
    canvas.paint(0.6 * canvas.cover(0, identity.nose_y, a * 0.12, b * 0.06, box), skin * 0.82, box)

    opening, spread, rounding = col(mouth[:, 0]), col(mouth[:, 1]), col(mouth[:, 2])
    half_width = identity.mouth_half_width * (0.7 + 0.5 * spread) * (1 - 0.3 * rounding)
    gap = identity.max_gap * opening
    mouth_cy = identity.mouth_y + gap / 2  # the jaw drops: the upper lip stays, the lower lip moves down
    box = canvas.box(0, mouth_cy, half_width, gap / 2 + identity.lip_thickness)
    canvas.paint(canvas.cover(0, mouth_cy, half_width, gap / 2 + identity.lip_thickness, box), identity.lip, box)
    inside = canvas.cover(0, mouth_cy, half_width * 0.85, np.maximum(gap / 2, 1e-6), box)
    canvas.paint(inside, _MOUTH_INSIDE, box)
    # The upper teeth: a band over the top quarter of the gap, only where the mouth is open (the metric reads the
    # dark extent below them, which stays proportional to the opening).
    teeth_half = np.maximum(gap * _TEETH_FRACTION / 2, 1e-6)
    teeth = inside * canvas.cover(0, identity.mouth_y + teeth_half, half_width * 0.6, teeth_half, box, power=4.0)
    canvas.paint(teeth, identity.teeth, box)
    return (np.clip(canvas.image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _clothes(canvas: _Canvas, identity: Identity, a: float, b: float) -> None:
    # The shoulders' top and width as a bust of b * 0.6 half height centred at b * 1.55 had, continued down as a
    # torso far enough to leave the picture in any framing.
    cx, cy, ha, hb = 0, b * 3.55, a * 1.9, b * 2.6
    box = canvas.box(cx, cy, ha, hb)
    rows, cols = box
    if identity.clothes_print:
        photo = identity.clothes_texture.sample(canvas.u[:, rows, cols], canvas.v[:, rows, cols], canvas.pixel)
        colour = np.asarray(identity.clothes, dtype=np.float32) + 2 * identity.clothes_contrast * (
            photo - np.asarray(identity.clothes, dtype=np.float32)
        )
    else:
        colour = canvas.textured(identity.clothes, identity.clothes_texture, identity.clothes_contrast, box)
    canvas.paint(canvas.cover(cx, cy, ha, hb, box, power=3.0), colour, box)


def _hair(canvas: _Canvas, identity: Identity, hair_a: float, hair_b: float, fringe: bool = False) -> None:
    """The hair cap (or, with `fringe`, its part above the hairline, painted over the face): strand texture, and an
    edge pushed in and out by the same strands, so it is wispy rather than a clean ellipse."""
    cy = -identity.face_half[1] * 0.12
    box = canvas.box(0, cy, hair_a * (1 + identity.hair_wisp), hair_b * (1 + identity.hair_wisp))
    rows, cols = box
    strands = identity.hair_texture.detail(canvas.u[:, rows, cols], canvas.v[:, rows, cols], canvas.pixel)[..., 0]
    edge = 1 + identity.hair_wisp * np.clip(strands, -2, 2) / 2
    alpha = canvas.cover(0, cy, hair_a * edge, hair_b * edge, box)
    if fringe:
        alpha = alpha * np.clip(0.5 - (canvas.v[:, rows, cols] - identity.hairline) / canvas.pixel, 0, 1)
    colour = np.asarray(identity.hair, dtype=np.float32) * (1 + identity.hair_contrast * strands[..., None])
    canvas.paint(alpha, colour, box)


def render_portrait(
    identity: Identity, height: int = 64, width: int | None = None, framing: Framing = DEFAULT_FRAMING
) -> np.ndarray:
    """The face at rest (no motion, eyes open, mouth closed): uint8 (H, W, 3)."""
    from model.synth.phones import REST

    pose = np.array([[0.0, 0.0, 0.0, 1.0]], dtype=np.float32)
    mouth = np.array([[REST.opening, REST.width, REST.rounding]], dtype=np.float32)
    return render(identity, pose, mouth, np.zeros(1, dtype=np.float32), height, width, framing)[0]
