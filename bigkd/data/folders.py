"""Which files of an image folder ROOT/{split}/{class}/* are its examples: one rule that training
(`sources.FolderSource`) and `python -m bigkd.prepare` both follow, so that streaming a folder
and preparing it give the same examples with the same labels.

The rule: classes are the sorted folder names of ROOT/train; files come in sorted order; names
starting with '.' (.DS_Store, macOS's ._x.jpg) and files that are no image are skipped and
counted; sub-folders of a class folder are ignored. A file is an image by its extension, or,
without one, by its first bytes (a JPEG saved without an extension). A class folder of another
split that train lacks is an error: its images would silently drop out of the evaluation.
"""
import os
from typing import NamedTuple

from bigkd.data.errors import DataError

TRAIN = 'train'
# What both decoders read: PIL (bigkd.prepare) and TF's decode_image (streaming). TF reads no
# TIFF, so .tif is skipped rather than prepared here and refused there.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.bmp', '.gif', '.webp')


class FolderSplit(NamedTuple):
  paths: list   # the images, classes in label order, files sorted
  labels: list  # int per path
  skipped: int  # files that are no image (hidden ones included)


def visible(names) -> list[str]:
  return sorted(n for n in names if not n.startswith('.'))


def class_names(root: str) -> list[str]:
  """The sorted (visible) folder names of ROOT/train: label i is the i-th."""
  train_dir = os.path.join(root, TRAIN)
  if not os.path.isdir(root):
    raise DataError(f'image folder {root} does not exist')
  if not os.path.isdir(train_dir):
    raise DataError(f'image folder {root} has no train/ folder (its class folders name the '
                    'classes)')
  names = [c for c in visible(os.listdir(train_dir)) if os.path.isdir(os.path.join(train_dir, c))]
  if not names:
    raise DataError(f'image folder {train_dir} has no class folders')
  return names


def has_image_signature(head: bytes) -> bool:
  """Whether a file's first 16 bytes start one of the formats of IMAGE_EXTENSIONS."""
  return (head.startswith((b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'GIF87a', b'GIF89a'))
          or (head[:2] == b'BM' and head[6:10] == bytes(4))  # BMP: its reserved bytes are 0
          or (head[:4] == b'RIFF' and head[8:12] == b'WEBP'))


def is_image(path: str) -> bool:
  """The rule for one file (the caller skips hidden names); reads 16 bytes only when the name
  has no image extension."""
  if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
    return True
  try:
    with open(path, 'rb') as f:
      return has_image_signature(f.read(16))
  except OSError as e:
    raise DataError(f'cannot read {path}: {e.strerror or e}') from None


def check_classes(split_dir: str, class_names: list[str]) -> None:
  """A class folder that train lacks is refused: dropping it would change the evaluation."""
  folders = [d for d in visible(os.listdir(split_dir)) if os.path.isdir(os.path.join(split_dir, d))]
  extra = sorted(set(folders) - set(class_names))
  if extra:
    raise DataError(f'class folder {extra[0]!r} of {split_dir} is not a class of train/: its '
                    'images would be left out (add it to train/ or remove it)')


def scan_split(root: str, split: str, class_names: list[str]) -> FolderSplit:
  """The images of ROOT/split by the rule above. A train class without images is an error (it
  would get a label and a head unit, never trained), and so is a split without any."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise DataError(f'image folder {split_dir} does not exist')
  check_classes(split_dir, class_names)
  paths, labels, skipped = [], [], 0
  for label, cls in enumerate(class_names):
    cls_dir = os.path.join(split_dir, cls)
    names = sorted(os.listdir(cls_dir)) if os.path.isdir(cls_dir) else []
    files = [n for n in names if os.path.isfile(os.path.join(cls_dir, n))]
    images = [n for n in visible(files) if is_image(os.path.join(cls_dir, n))]
    if not images and split == TRAIN:
      raise DataError(f'class folder {cls_dir} has no images ({", ".join(IMAGE_EXTENSIONS)})')
    paths += [os.path.join(cls_dir, n) for n in images]
    labels += [label] * len(images)
    skipped += len(files) - len(images)
  if not paths:
    raise DataError(f'no images under {split_dir}')
  return FolderSplit(paths, labels, skipped)


def scan_images(root: str) -> FolderSplit:
  """The images directly in `root` (sorted, by the rule above), unlabeled (label -1 each): a
  folder of images without class folders."""
  if not os.path.isdir(root):
    raise DataError(f'image folder {root} does not exist')
  files = [n for n in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, n))]
  images = [os.path.join(root, n) for n in visible(files) if is_image(os.path.join(root, n))]
  if not images:
    raise DataError(f'no images directly in {root} ({", ".join(IMAGE_EXTENSIONS)}; sub-folders '
                    'are not read)')
  return FolderSplit(images, [-1] * len(images), len(files) - len(images))
