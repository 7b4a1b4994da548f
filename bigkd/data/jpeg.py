"""An image's encoded bytes -> the JPEG that a record stores (bigkd.prepare's conversion).

One decoder (PIL) for every input format, so that a corrupt file stops preparation rather than
a training run; a JPEG that needs no change is kept byte for byte.
"""
import io
import warnings
from typing import Optional

import numpy as np

JPEG_QUALITY = 95
# 4:4:4 (no chroma subsampling): at the sizes of small datasets (CIFAR-like PNGs) 4:2:0 would
# halve the colour resolution of every re-encoded image; it costs about 1.5x their bytes.
JPEG_SUBSAMPLING = 0


class UndecodableImage(Exception):
  """Bytes that no image decoder accepts."""


def storable(image):
  """The image in a mode that a baseline JPEG holds and every decoder reads: grey stays grey
  ('L'), 16-bit grey is scaled to 8 bits, everything else (palette, alpha, CMYK) becomes RGB
  (alpha dropped, as TF's decoders do)."""
  from PIL import Image
  if image.mode in ('RGB', 'L'):
    return image
  if image.mode in ('1', 'LA', 'La'):
    return image.convert('L')
  if image.mode.startswith('I'):
    grey = np.clip(np.round(np.asarray(image, np.float64) / 257.0), 0, 255)
    return Image.fromarray(grey.astype(np.uint8), 'L')
  return image.convert('RGB')


def capped_size(width: int, height: int, max_short_side: int) -> Optional[tuple[int, int]]:
  """(width, height) with the short side at `max_short_side` and the aspect kept, or None when
  the image is within the cap (or there is none, 0)."""
  short = min(width, height)
  if not max_short_side or short <= max_short_side:
    return None
  scale = max_short_side / short
  if width <= height:
    return max_short_side, max(1, round(height * scale))
  return max(1, round(width * scale)), max_short_side


def to_jpeg(data: bytes, max_short_side: int) -> tuple[bytes, int, int]:
  """(JPEG bytes, height, width) to store for encoded image bytes. The image is decoded once in
  full, so that a corrupt file stops preparation rather than a training run; a JPEG that needs
  no change is returned as it was, byte for byte."""
  from PIL import Image
  try:
    with warnings.catch_warnings():  # PIL warns about palettes, EXIF, big images: not our concern
      warnings.simplefilter('ignore')
      image = Image.open(io.BytesIO(data))
      image.load()
      kept = storable(image)
      size = capped_size(kept.width, kept.height, max_short_side)
      if size:
        kept = kept.resize(size, Image.Resampling.BICUBIC)  # antialiased when shrinking
  except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, ...)
    raise UndecodableImage(str(e)) from None
  if image.format in ('JPEG', 'MPO') and kept is image:
    return data, image.height, image.width
  out = io.BytesIO()
  kept.save(out, 'JPEG', quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
  return out.getvalue(), kept.height, kept.width
