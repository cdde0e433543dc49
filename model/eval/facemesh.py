"""Mouth opening of real faces from a face mesh (mediapipe 0.10.14; its models ship inside the wheel).

The opening is the gap between the inner-lip landmarks (13 upper, 14 lower) divided by the distance
between the outer eye corners (33, 263), which a dropping jaw does not change.
"""

from __future__ import annotations

import numpy as np

from model.errors import InputError

UPPER_INNER_LIP, LOWER_INNER_LIP = 13, 14
EYE_OUTER = (33, 263)
MIN_SIDE = 256  # smaller images are upscaled for the mesh (it finds no face in a 64x64 astronaut scaled to 128)
# Outer lip contour (mediapipe FACEMESH_LIPS): bounds the mouth region left out of identity comparisons.
LIP_CONTOUR = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409)
# Face oval (mediapipe FACEMESH_FACE_OVAL): forehead to chin, cheek to cheek; hair and ears are outside it.
FACE_OVAL = (
    *(10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377),
    *(152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109),
)


class FaceMesh:
    """One mediapipe face mesh; `tracking=True` follows a face through consecutive video frames."""

    def __init__(self, tracking: bool = False):
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=not tracking, max_num_faces=1, refine_landmarks=False, min_detection_confidence=0.5
        )

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """(468, 2) pixel (x, y) landmarks of the most prominent face in uint8 RGB (H, W, 3), or None. An image
        smaller than `MIN_SIDE` is upscaled for the mesh; the landmarks are in the image's own pixels."""
        height, width = image.shape[:2]
        factor = int(np.ceil(MIN_SIDE / min(height, width)))
        if factor > 1:
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((width * factor, height * factor), Image.BICUBIC))
        result = self._mesh.process(np.ascontiguousarray(image))
        if not result.multi_face_landmarks:
            return None
        points = result.multi_face_landmarks[0].landmark
        return np.array([(p.x * width, p.y * height) for p in points], dtype=np.float32)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceMesh:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def face_landmarks(image: np.ndarray, source: str = "portrait") -> np.ndarray:
    """The (468, 2) landmarks of the image's face (one still image); InputError naming `source` if there is none."""
    with FaceMesh() as mesh:
        points = mesh.landmarks(image)
    if points is None:
        raise InputError(source, "no face found by the face mesh")
    return points


def opening_from_landmarks(points: np.ndarray) -> float:
    gap = float(np.linalg.norm(points[LOWER_INNER_LIP] - points[UPPER_INNER_LIP]))
    eyes = float(np.linalg.norm(points[EYE_OUTER[0]] - points[EYE_OUTER[1]]))
    return gap / max(eyes, 1e-6)


class OpeningTracker:
    """Mouth opening frame after frame, the face followed across calls (`update` chunk by chunk)."""

    def __init__(self):
        self._mesh = FaceMesh(tracking=True)

    def update(self, frames: np.ndarray) -> np.ndarray:
        """(n,) opening of uint8 (n, H, W, 3) frames; NaN where no face is found."""
        values = []
        for frame in frames:
            points = self._mesh.landmarks(frame)
            values.append(np.nan if points is None else opening_from_landmarks(points))
        return np.array(values, dtype=np.float64)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> OpeningTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fill_missing(values: np.ndarray) -> np.ndarray:
    """Openings of frames without a face, filled from their neighbours (all NaN if no frame has one)."""
    found = ~np.isnan(values)
    if found.any() and not found.all():
        values = np.interp(np.arange(len(values)), np.nonzero(found)[0], values[found])
    return values


def facemesh_opening(frames: np.ndarray) -> np.ndarray:
    """(N,) mouth opening per frame; frames where no face is found are filled from their neighbours
    (NaN if no frame has a face)."""
    with OpeningTracker() as tracker:
        return fill_missing(tracker.update(frames))


def facemesh_mouth_box(portrait: np.ndarray, source: str = "portrait", pad: float = 0.5) -> tuple[slice, slice]:
    """Rows and columns around the lips of the portrait's face, padded by `pad` of the mouth's size."""
    lips = face_landmarks(portrait, source)[list(LIP_CONTOUR)]
    (x0, y0), (x1, y1) = lips.min(axis=0), lips.max(axis=0)
    px, py = pad * (x1 - x0), pad * (y1 - y0) + 0.5 * (x1 - x0)  # room below for the jaw to drop
    height, width = portrait.shape[:2]
    return (
        slice(max(int(y0 - px), 0), min(int(np.ceil(y1 + py)), height)),
        slice(max(int(x0 - px), 0), min(int(np.ceil(x1 + px)), width)),
    )


def face_oval_box(image: np.ndarray, source: str = "portrait") -> tuple[float, float, float]:
    """The face oval's centre (x, y) and height, in the image's pixels."""
    oval = face_landmarks(image, source)[list(FACE_OVAL)]
    (x0, y0), (x1, y1) = oval.min(axis=0), oval.max(axis=0)
    return float(x0 + x1) / 2, float(y0 + y1) / 2, float(y1 - y0)
