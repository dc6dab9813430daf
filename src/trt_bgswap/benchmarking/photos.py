"""Real photos to benchmark and calibrate on: public-domain images shipped with scikit-image, or files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trt_bgswap.errors import BackendUnavailable, UsageError

# skimage.data photos bundled with the package (no download): RGB, public domain / CC0.
DEFAULT_PHOTO = "astronaut"
CALIBRATION_PHOTOS = ("chelsea", "coffee", "rocket", "immunohistochemistry")
ACCURACY_PHOTOS = ("astronaut", "hubble_deep_field", "retina", "camera")  # held out from calibration


def load_photo(name: str) -> np.ndarray:
    """A uint8 HxWx3 photo: a path, or the name of a scikit-image sample photo."""
    p = Path(name)
    if p.suffix and p.is_file():
        from trt_bgswap.runtime.image_read import read_image

        return read_image(p).rgb
    try:
        from skimage import data
    except ImportError as e:
        raise BackendUnavailable(f"photo {name!r} is a scikit-image sample; pip install scikit-image, or give an image path") from e
    loader = getattr(data, name, None)
    if loader is None:
        raise UsageError(f"photo {name!r}: not a file and not a skimage.data sample (try astronaut, chelsea, coffee, rocket)")
    im = np.asarray(loader())
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    if im.ndim != 3 or im.shape[2] < 3 or im.dtype != np.uint8:
        raise UsageError(f"photo {name!r} is {im.dtype} {im.shape}; pick an RGB photo")
    return np.ascontiguousarray(im[..., :3])
