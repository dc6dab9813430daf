"""The photo's colour space: the models and colours work in sRGB, the output stays in the photo's space.

A photo tagged with a wide-gamut ICC profile (Display P3, Adobe RGB) holds numbers that mean
other colours than the same numbers in sRGB. The composite keeps the subject's pixels bit
for bit and writes the photo's profile back, so what is painted behind the subject must be
in the photo's space too: a user's ``#1e90ff`` (an sRGB colour) is converted into it, and so
is the generated background (the diffusion model and RMBG were trained on sRGB photos, so
they see the photo converted to sRGB). Transforms use LittleCMS through Pillow's ``ImageCms``
(relative colorimetric intent), built once per profile.
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class ColorSpace:
    """sRGB <-> the photo's ICC space for uint8 RGB arrays; the identity for sRGB or untagged photos."""

    def __init__(self, icc: bytes | None = None) -> None:
        self.icc = icc
        self._to_srgb = self._from_srgb = None
        if icc and not _is_srgb(icc):
            try:
                from PIL import ImageCms

                photo = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                srgb = ImageCms.createProfile("sRGB")
                self._to_srgb = ImageCms.buildTransform(photo, srgb, "RGB", "RGB")
                self._from_srgb = ImageCms.buildTransform(srgb, photo, "RGB", "RGB")
                self.name = ImageCms.getProfileDescription(photo).strip()
            except Exception as e:  # noqa: BLE001 - an unusable profile must not cost the image
                log.warning("the photo's ICC profile is unusable (%s); treating its colours as sRGB", " ".join(str(e).split()))
                self._to_srgb = self._from_srgb = None

    def to_srgb(self, rgb: np.ndarray) -> np.ndarray:
        """The photo as the models see it (uint8 HxWx3 sRGB)."""
        return rgb if self._to_srgb is None else _apply(self._to_srgb, rgb)

    def from_srgb(self, rgb: np.ndarray) -> np.ndarray:
        """sRGB pixels (a generated or solid background) in the photo's space, to sit beside its subject."""
        return rgb if self._from_srgb is None else _apply(self._from_srgb, rgb)

    def color_from_srgb(self, color: tuple[int, int, int]) -> tuple[int, int, int]:
        """One sRGB colour in the photo's space."""
        out = self.from_srgb(np.asarray(color, dtype=np.uint8).reshape(1, 1, 3))
        return tuple(int(v) for v in out[0, 0])  # type: ignore[return-value]


def _apply(transform: object, rgb: np.ndarray) -> np.ndarray:
    from PIL import ImageCms

    out = ImageCms.applyTransform(Image.fromarray(np.ascontiguousarray(rgb), "RGB"), transform)  # type: ignore[arg-type]
    return np.asarray(out, dtype=np.uint8)


@functools.lru_cache(maxsize=16)
def _is_srgb(icc: bytes) -> bool:
    """Whether a profile is an sRGB one (camera and OS profiles name it 'sRGB IEC61966-2.1' and similar)."""
    try:
        from PIL import ImageCms

        return "srgb" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).lower()
    except Exception:  # noqa: BLE001 - unreadable: the caller treats it as sRGB with a warning
        return False
