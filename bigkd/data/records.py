"""The on-disk format of prepared data: what `python -m bigkd.prepare` writes and training reads.

OUT/{split}/*.array_record hold one record per example: a 16-byte header of little-endian int32s
(format version, label, height, width) followed by a JPEG. OUT/{split}/info.json names the
shards in order and the classes. Writer and reader both import this module and nothing else of
each other.
"""
import struct

from bigkd import paths
from bigkd.data.errors import DataError

RECORD_VERSION = 1
HEADER = struct.Struct('<4i')  # version, label, height, width
RECORD_FORMAT = "'<4i' header (version, label, height, width), then JPEG bytes"
# One record per chunk, so reading record i reads only record i; JPEGs do not compress further.
WRITER_OPTIONS = 'group_size:1,uncompressed'
INFO = 'info.json'


def encode_record(image_bytes: bytes, label: int, height: int, width: int) -> bytes:
  """One example as one record. The fixed header comes first so that a reader knows the label
  and the image size without decoding the image; the version guards against stale files."""
  return HEADER.pack(RECORD_VERSION, label, height, width) + bytes(image_bytes)


def decode_record(record: bytes) -> tuple[bytes, int, int, int]:
  """(image_bytes, label, height, width) of a record written by `encode_record`."""
  version, label, height, width = HEADER.unpack_from(record)
  if version != RECORD_VERSION:
    raise DataError(f'record format version {version}, expected {RECORD_VERSION}: prepare the '
                    'data again with this version of bigkd')
  return bytes(record[HEADER.size:]), label, height, width


def read_info(folder: str) -> dict:
  """FOLDER/info.json (a split's, or OUT's own); OSError when it was never written."""
  return paths.read_json(paths.Path(folder) / INFO)


class RecordSplit:
  """A prepared split, `OUT/{split}`: record i -> (image_bytes, label, height, width), the index
  running over the shards in order. Pickles as its paths alone (grain copies sources into its
  workers), and opens the shards on first access."""

  def __init__(self, out_dir: str, split: str):
    split_dir = paths.Path(out_dir) / split
    self.info = read_info(split_dir)  # OSError: not prepared
    self.paths = [str(split_dir / name) for name in self.info['shards']]
    self.class_names = list(self.info['class_names'])
    self.num_classes = int(self.info['num_classes'])
    self._records = None

  def __len__(self):
    return int(self.info['num_examples'])

  def __getitem__(self, i):
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f'record {i} of a split of {len(self)}')
    return decode_record(self.records()[i % len(self)])

  def records(self):
    """grain's reader over the shards, opened once per process."""
    if self._records is None:
      import grain
      self._records = grain.sources.ArrayRecordDataSource(self.paths)
      if len(self._records) != len(self):
        raise DataError(f'{paths.Path(self.paths[0]).parent}: {len(self._records)} records, '
                        f'info.json says {len(self)}')
    return self._records

  def __getstate__(self):
    return {**self.__dict__, '_records': None}

  def __repr__(self):
    return f'RecordSplit({len(self)} records in {len(self.paths)} shards)'
