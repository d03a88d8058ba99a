"""Images from untrusted bytes: the size is checked from the header before a single pixel is decoded.

A scoring server decodes whatever a client sends. Pillow's ``Image.open`` reads only the header, and ``load()``
then allocates ``width x height x channels`` bytes whatever the file's own size: an 8000 x 8000 PNG of 8 KB decodes
to 192 MB of RGB (more during conversion) and takes seconds of CPU before scoring even starts. So ``open_image``
refuses images outside ``ImageLimits`` from the header alone, in microseconds, and ``decode`` runs only on images
that passed. The minimum side exists because an image of a few pixels has a map of a few pixels, which is no
anomaly map (a 1 x 1 image got a score its single map value contradicted).

Only the formats datasets are read in (``datasets.IMAGE_EXTENSIONS``) are opened, so a request can never reach
Pillow's rarer decoders (EPS, for one, runs Ghostscript). Strings are base64 and nothing else: no path a client
names is ever opened, and no message says whether a file exists.

    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("RGB", (64, 48)).save(buffer, format="PNG")
    >>> image = open_image(buffer.getvalue(), "image 0", ImageLimits())  # header only
    >>> decode(image, "image 0").shape
    (48, 64, 3)
    >>> open_image(buffer.getvalue(), "image 0", ImageLimits(max_pixels=1000))
    Traceback (most recent call last):
    ...
    bgad_core.data.image_input.ImageTooLarge: image 0: 64 x 48 = 3072 pixels, more than the limit of 1000
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bgad_core.data.datasets import rgb_image
from bgad_core.errors import ConfigError, DataError

FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # Pillow's names for the suffixes of datasets.IMAGE_EXTENSIONS
DEFAULT_MAX_PIXELS = 4096 * 4096  # 16 MP: a 4096 x 4096 image decodes to 48 MB of RGB
DEFAULT_MIN_SIDE = 32  # the coarsest feature map of a stride-32 backbone is one cell at this size


class ImageTooLarge(DataError):
    """More pixels than the limit: refused from the header, before decoding."""


class ImageTooSmall(DataError):
    """A side shorter than the minimum: its anomaly map would be a few pixels."""


@dataclass(frozen=True)
class ImageLimits:
    """What a request may contain: at most ``max_pixels`` pixels and at least ``min_side`` pixels per side."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE

    def __post_init__(self) -> None:
        # Above Pillow's own decompression-bomb limit, Pillow would refuse the image before this limit applies.
        if not 1 <= self.max_pixels <= Image.MAX_IMAGE_PIXELS:
            raise ConfigError(f"max_pixels: expected 1 to {Image.MAX_IMAGE_PIXELS} (Pillow's bomb limit), "
                              f"got {self.max_pixels}")
        if self.min_side < 1:
            raise ConfigError(f"min_side: expected at least 1, got {self.min_side}")

    def check(self, width: int, height: int, name: str) -> None:
        """Raise ``ImageTooLarge`` / ``ImageTooSmall`` for a ``width x height`` image outside the limits."""
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"{name}: {width} x {height} = {width * height} pixels, more than the limit of "
                                f"{self.max_pixels}")
        if min(width, height) < self.min_side:
            raise ImageTooSmall(f"{name}: {width} x {height} pixels, the minimum is {self.min_side} per side")


def from_base64(text: str, name: str) -> bytes:
    """The bytes a base64 string encodes; anything else (a file path, say) is an error that names no file."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise DataError(f"{name}: not base64-encoded image bytes (strings are never read as file paths)") from err


def open_image(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    """The image ``data`` holds, opened lazily (header only) and checked against ``limits``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"{name}: more than {limits.max_pixels} pixels (Pillow's bomb check)") from err
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise DataError(f"{name}: not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image") from err
    limits.check(*image.size, name)
    return image


def decode(image: Image.Image, name: str) -> np.ndarray:
    """The pixels of an ``open_image`` result as uint8 ``[H, W, 3]``, converted as training images are."""
    try:
        image.load()
        return np.asarray(rgb_image(image), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data after a valid header
        raise DataError(f"{name}: cannot decode the image data ({err})") from err


def check_array(array: np.ndarray, name: str, limits: ImageLimits) -> np.ndarray:
    """An already decoded ``[H, W, ...]`` image, checked against the same limits as encoded ones."""
    if array.ndim < 2:
        raise DataError(f"{name}: expected an [H, W, 3] or [H, W] image, got shape {list(array.shape)}")
    limits.check(array.shape[1], array.shape[0], name)
    return array
