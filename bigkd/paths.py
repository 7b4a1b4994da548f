"""Where a run's files live: a local folder or a bucket (gs://), through one path type.

On a multi-host slice the hosts share no disk, so the workdir, teacher stage folders and
`.npz` files live in a bucket, as in big_vision and MaxText. Every file bigkd reads or writes
there goes through `etils.epath.Path`, the path type orbax uses. Bucket paths go through
fsspec's gcsfs (`EPATH_USE_TF=false`, set here unless the environment sets it), without a
listings cache: one client for bigkd's files and orbax's metadata, and one that can be pointed at
a local GCS emulator (tests/test_bucket.py); orbax's arrays go through TensorStore. A bucket has
no append, no folders and no atomic rename, but writing an object is all-or-nothing: files are
written whole.
"""
import json
import os

os.environ.setdefault('EPATH_USE_TF', 'false')
import fsspec  # noqa: E402
from etils import epath  # noqa: E402

# No listings cache: on many hosts each must see at once what another just wrote or moved (a
# checkpoint moved aside by process 0 is gone for process 1's next save).
fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)

Path = epath.Path


def is_bucket(path) -> bool:
  """True for a bucket path (gs://..., or any other scheme epath serves), False for a local one."""
  return '://' in os.fspath(path)


def bucket_of(path) -> epath.Path:
  """gs://BUCKET of gs://BUCKET/a/b."""
  scheme, rest = os.fspath(path).split('://', 1)
  return Path(f'{scheme}://{rest.split("/")[0]}')


def absolute(path) -> epath.Path:
  """A local path made absolute (orbax wants one); a bucket path as it is."""
  path = Path(path)
  return path if is_bucket(path) else path.absolute()


def make_dirs(path) -> None:
  """A local folder (and its parents) made; nothing for a bucket, where a folder is only the
  common prefix of its objects' names and exists once one of them is written."""
  if not is_bucket(path):
    Path(path).mkdir(parents=True, exist_ok=True)


def write_text(path, text: str) -> None:
  """`path` written whole: locally through a temporary file renamed over it (a reader never sees
  half a file); in a bucket, one object write, which is all-or-nothing."""
  write_bytes(path, text.encode())


def write_bytes(path, data: bytes) -> None:
  """As `write_text`, for bytes."""
  path = Path(path)
  if is_bucket(path):
    path.write_bytes(data)
    return
  make_dirs(path.parent)
  tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # processes writing it at once
  tmp.write_bytes(data)
  tmp.replace(path)


def append_text(path, text: str) -> None:
  """`text` added at the end of `path`: appended locally; in a bucket (no append) the object is
  read and written again whole, so keep such files small (a log of changes, not of steps)."""
  path = Path(path)
  if is_bucket(path):
    path.write_text((path.read_text() if path.exists() else '') + text)
    return
  make_dirs(path.parent)
  with path.open('a') as f:
    f.write(text)


def read_json(path):
  return json.loads(Path(path).read_text())


def write_json(path, value, indent: int | None = 1) -> None:
  write_text(path, json.dumps(value, indent=indent))


def move(source, destination) -> None:
  """Moves a folder to `destination`, replacing one already there. In a bucket a move is a copy
  of every object, then a delete (gcsfs's own move first tries an API that only buckets with a
  hierarchical namespace have)."""
  source, destination = Path(source), Path(destination)
  if destination.exists():
    destination.rmtree()
  if is_bucket(source):
    fs, source_path = fsspec.core.url_to_fs(os.fspath(source))
    fs.copy(source_path, fsspec.core.url_to_fs(os.fspath(destination))[1], recursive=True)
    fs.rm(source_path, recursive=True)
    return
  make_dirs(destination.parent)
  source.rename(destination)
