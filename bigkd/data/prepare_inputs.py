"""What bigkd.prepare reads: an image folder or a tfds dataset, as one plan per output split
whose items (one per example) come in a fixed order, so that the same input gives the same bytes.
"""
import os
import re
from typing import NamedTuple, Optional

from bigkd.data import folders
from bigkd.data.errors import DataError
from bigkd.tf_quiet import import_tfds

FOLDER_SPLITS = ('train', 'val', 'test')  # --folder's default splits (those that exist)


class Item(NamedTuple):
  """One input example. `name` is what error lines and info.json call it (a file path, or
  tfds:NAME:SPLIT:INDEX); `data` is None for a file, read in the worker, or the encoded bytes."""
  name: str
  label: int
  data: Optional[bytes]


class SplitPlan(NamedTuple):
  name: str       # output folder
  source: dict    # where it comes from (info.json's 'source')
  count: int      # input examples (images), before any corrupt one is skipped
  items: object   # () -> iterator of Item, in order
  skipped: int    # files that are no image (folders.scan_split)
  shards: int = 0  # set by bigkd.prepare


def parse_splits(text: str) -> list[tuple[str, str]]:
  """'train[:90%]=train,train[90%:]=val,test' -> [(source split, output name), ...]."""
  pairs = []
  for part in filter(None, (p.strip() for p in text.split(','))):
    source, _, name = part.partition('=')
    name = name or source
    if not re.fullmatch(r'[A-Za-z0-9_][A-Za-z0-9_.-]*', name):
      raise DataError(f'--splits: {part!r} needs an output name of letters, digits, _ . - '
                      f'(e.g. {source}=train)')
    pairs.append((source, name))
  names = [name for _, name in pairs]
  if len(set(names)) != len(names):
    raise DataError(f'--splits: an output name appears twice ({",".join(names)})')
  return pairs


def folder_plans(root: str, splits_text: str) -> tuple[list[str], list[SplitPlan]]:
  """(class names, plans) of an image folder's splits, by the folder rule of folders.py."""
  root, pairs = os.path.abspath(root), parse_splits(splits_text)
  class_names = folders.class_names(root)
  pairs = pairs or [
      (s, s) for s in FOLDER_SPLITS if os.path.isdir(os.path.join(root, s))]
  plans = []
  for source, name in pairs:
    found = folders.scan_split(root, source, class_names)
    items = [Item(path, label, None) for path, label in zip(found.paths, found.labels)]
    plans.append(SplitPlan(name, {'folder': root, 'split': source}, len(items),
                           lambda items=items: iter(items), found.skipped))
  return class_names, plans


def tfds_builder(name: str, data_dir: str):
  tfds = import_tfds()
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # noqa: BLE001  (tfds raises several types for an unknown name)
    raise DataError(f'tfds dataset {name!r}: {first_line(e)}') from None
  features = builder.info.features
  if 'image' not in features or 'label' not in features or not hasattr(features['label'], 'names'):
    raise DataError(f"tfds dataset {name!r} has no 'image' and class 'label' features")
  return builder


def tfds_dataset(builder, name: str, data_dir: str, split: str):
  """The split's examples with the images still encoded (nothing decoded, nothing downloaded)."""
  tfds = import_tfds()
  try:
    return builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()},
                              shuffle_files=False)
  except Exception as e:  # noqa: BLE001  (not prepared in data_dir, bad split expression, ...)
    raise DataError(f'tfds dataset {name!r} split {split!r} in data_dir {data_dir!r}: '
                    f'{first_line(e)}') from None


def tfds_count(builder, split: str, dataset) -> int:
  """The split's size from the dataset's metadata, else (no metadata) by reading it once."""
  try:
    return int(builder.info.splits[split].num_examples)
  except Exception:  # noqa: BLE001  (no recorded splits, e.g. tfds.testing.mock_data)
    return sum(1 for _ in dataset)


def tfds_items(dataset, name: str, split: str):
  """Items with the encoded image bytes, in the dataset's order."""
  tfds = import_tfds()
  for i, example in enumerate(tfds.as_numpy(dataset)):
    yield Item(f'tfds:{name}:{split}:{i}', int(example['label']), bytes(example['image']))


def tfds_plans(name: str, data_dir: str, splits_text: str) -> tuple[list[str], list[SplitPlan]]:
  """(class names, plans) of a tfds dataset's splits (or of the split expressions given)."""
  builder = tfds_builder(name, data_dir)
  pairs = parse_splits(splits_text) or [(s, s) for s in builder.info.splits]
  if not pairs:
    raise DataError(f'tfds dataset {name!r} records no splits in data_dir {data_dir!r}: '
                    'give --splits')
  plans = []
  for split, out_name in pairs:
    dataset = tfds_dataset(builder, name, data_dir, split)
    count = tfds_count(builder, split, dataset)
    source = {'tfds': name, 'data_dir': data_dir, 'split': split}
    plans.append(SplitPlan(out_name, source, count,
                           lambda d=dataset, s=split: tfds_items(d, name, s), 0))
  return list(builder.info.features['label'].names), plans


def first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]
