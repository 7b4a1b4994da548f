"""Prepare: an image folder or a tfds dataset -> sharded ArrayRecord files, one JPEG per record.

  python -m bigkd.prepare (--folder ROOT | --tfds NAME [--tfds_data_dir DIR]) --out OUT
      [--splits SRC[=NAME],...] [--shards N] [--max_short_side S] [--workers K]
      [--on_corrupt error|skip]

Examples:
  python -m bigkd.prepare --folder ~/data/birds --out ~/data/birds_ar --max_short_side 512
  python -m bigkd.prepare --tfds oxford_flowers102 --tfds_data_dir ~/tensorflow_datasets \\
      --splits 'train+validation=train,test' --out ~/data/flowers_ar

Why: training reads random examples by index (grain). An ArrayRecord shard returns any record
with one read, where a tfrecord can only be scanned and a folder of many small files is slow on
network disks; capping the short side once (--max_short_side) saves decoding time every epoch.

Inputs: --folder reads ROOT/{split}/{class}/*, the classes being the sorted folder names of
ROOT/train (a split may lack some, not add one); default splits: those of train, val, test that
exist. Its images are those that training streams (bigkd/data/folders.py): .jpg .jpeg .jpe .jfif
.png .bmp .gif .webp, or a file without an extension whose bytes are one of these.
--tfds reads a tfds dataset already prepared in --tfds_data_dir (nothing is downloaded), its
'image' and 'label' features; --splits lists tfds split expressions, each =NAME for its output
folder, e.g. 'train[:90%]=train,train[90%:]=val,test' (default: every split, under its name).

Output: OUT/{split}/{split}-{i:05d}-of-{n:05d}.array_record, OUT/{split}/info.json (counts,
class names, shard files, skipped files) and OUT/info.json. Shard i holds a contiguous range of
the examples, which come in a fixed order (classes sorted, files sorted), so the same input gives
the same bytes. A record is a 16-byte header of little-endian int32s (format version, label,
height, width) followed by a JPEG: JPEGs within the size cap are kept byte for byte; every other
image (PNG, BMP, WebP, GIF's first frame, a CMYK JPEG, one above the cap) is re-encoded (quality
95, no chroma subsampling). Grey stays grey. Read a split with
bigkd.data.records.RecordSplit(OUT, split).

Re-running the same command skips complete shards: each shard is written under a temporary name
and renamed once complete (its counts beside it in {shard}.stats.json), so a killed run loses
only the shards in flight. Files that are no image (.DS_Store, notes.txt, hidden ones) are
skipped and counted; a corrupt image stops the run (--on_corrupt=skip skips it and lists it in
info.json).

Exit codes: 0 success; 2 bad command line or input (one line on stderr); 1 anything else.
"""
import hashlib
import itertools
import json
import multiprocessing
import os
import queue
import sys
import time
from typing import NamedTuple, Optional

from absl import flags

from bigkd import cli
from bigkd.data.errors import DataError
from bigkd.data.jpeg import JPEG_QUALITY, JPEG_SUBSAMPLING, UndecodableImage, to_jpeg
from bigkd.data.prepare_inputs import Item, SplitPlan, first_line, folder_plans, tfds_plans
from bigkd.data.records import (RECORD_FORMAT, RECORD_VERSION, WRITER_OPTIONS, encode_record,
                                read_info)

IMAGES_PER_SHARD = 1000
SHARD_SUFFIX, STATS_SUFFIX, TMP_SUFFIX = '.array_record', '.stats.json', '.tmp'


# --- One item: its bytes in, its record out (runs in the worker processes). ----------------

class CorruptImage(Exception):
  """An input that is an image (by the folder rule, or a tfds image feature) but does not decode."""


def read_item(item: Item) -> bytes:
  """The item's encoded bytes: its own, or its file's."""
  if item.data is not None:
    return item.data
  with open(item.name, 'rb') as f:
    return f.read()


def item_record(item: Item, max_short_side: int) -> bytes:
  """The record of one item; CorruptImage when there is none to write."""
  data = read_item(item)
  try:
    jpeg, height, width = to_jpeg(data, max_short_side)
  except UndecodableImage:
    raise CorruptImage(item.name) from None
  return encode_record(jpeg, item.label, height, width)


# --- One shard (a worker's unit of work). -----------------------------------------------------

class ShardTask(NamedTuple):
  split: str
  index: int
  path: str
  items: list
  settings: dict  # everything the shard's bytes depend on: a complete shard is reused only if equal
  on_corrupt: str


class ShardError(Exception):
  """A problem with the input that stops the run (a corrupt image, an unreadable file)."""


def corrupt_message(name: str) -> str:
  return f'corrupt image {name} (use --on_corrupt=skip to skip it)'


def write_records(writer, task: ShardTask) -> dict:
  """Writes the records of `task.items`, returning the counts; ShardError stops it."""
  counts = {'num_examples': 0, 'skipped_corrupt': []}
  for item in task.items:
    try:
      writer.write(item_record(item, task.settings['max_short_side']))
      counts['num_examples'] += 1
    except CorruptImage:
      if task.on_corrupt == 'error':
        raise ShardError(corrupt_message(item.name)) from None
      counts['skipped_corrupt'].append(item.name)
    except OSError as e:
      raise ShardError(f'cannot read {item.name}: {e.strerror or e}') from None
  return counts


def write_shard(task: ShardTask) -> dict:
  """Writes one shard: the records under a temporary name, then its counts, then the rename that
  marks it complete (so an interrupted shard is never mistaken for a complete one). Returns the
  counts, or {'error': line} for a problem with the input (its temporary file removed)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  tmp = task.path + TMP_SUFFIX
  writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
  try:
    counts = write_records(writer, task)
  except ShardError as e:
    writer.close()
    os.remove(tmp)
    return {'split': task.split, 'index': task.index, 'error': str(e)}
  writer.close()
  with open(tmp, 'rb') as f:
    os.fsync(f.fileno())
  write_json(stats_path(task.path), {**counts, 'settings': task.settings})
  os.replace(tmp, task.path)
  return {'split': task.split, 'index': task.index, 'items': len(task.items), **counts}


def write_json(path: str, value) -> None:
  """Writes JSON atomically (temporary file, then rename): a reader never sees half a file."""
  with open(path + TMP_SUFFIX, 'w') as f:
    f.write(json.dumps(value, indent=1, sort_keys=True) + '\n')
  os.replace(path + TMP_SUFFIX, path)


def stats_path(shard_path: str) -> str:
  return shard_path[:-len(SHARD_SUFFIX)] + STATS_SUFFIX


# --- Shards: planned, reused when complete, written by a pool. -------------------------------

def default_shards(count: int) -> int:
  return max(1, round(count / IMAGES_PER_SHARD))


def shard_ranges(count: int, shards: int) -> list[tuple[int, int]]:
  """Contiguous [start, end) ranges of `count` examples over `shards` shards, sizes within one."""
  return [(i * count // shards, (i + 1) * count // shards) for i in range(shards)]


def shard_name(split: str, index: int, shards: int) -> str:
  return f'{split}-{index:05d}-of-{shards:05d}{SHARD_SUFFIX}'


def shard_settings(plan: SplitPlan, start: int, items: list, max_short_side: int) -> dict:
  """What a shard's bytes depend on. The digest of its items' names and labels notices a folder
  that gained or lost files since the shard was written."""
  digest = hashlib.sha256(''.join(f'{it.label}\t{it.name}\n' for it in items).encode())
  return {'version': RECORD_VERSION, 'source': plan.source, 'start': start, 'count': len(items),
          'max_short_side': max_short_side, 'jpeg': [JPEG_QUALITY, JPEG_SUBSAMPLING],
          'items_sha256': digest.hexdigest()}


def complete_counts(path: str, settings: dict) -> Optional[dict]:
  """The counts of a complete shard written with these settings, else None (write it again)."""
  if not os.path.exists(path) or not os.path.exists(stats_path(path)):
    return None
  with open(stats_path(path)) as f:
    stats = json.load(f)
  return stats if stats.pop('settings', None) == settings else None


def start_split(out: str, plan: SplitPlan) -> int:
  """Makes OUT/split, removes what an interrupted run left half-written there and returns how
  many shards look complete (their file and counts exist)."""
  split_dir = os.path.join(out, plan.name)
  os.makedirs(split_dir, exist_ok=True)
  for name in os.listdir(split_dir):
    if name.endswith(TMP_SUFFIX):
      os.remove(os.path.join(split_dir, name))
  paths = [os.path.join(split_dir, shard_name(plan.name, i, plan.shards))
           for i in range(plan.shards)]
  return sum(os.path.exists(p) and os.path.exists(stats_path(p)) for p in paths)


def shard_steps(out: str, plans: list[SplitPlan], max_short_side: int, on_corrupt: str):
  """Walks every split's items in order and yields, per shard, the counts of a complete one
  (reused) or the ShardTask that writes it. A reused shard that skipped a corrupt image still
  stops a run with --on_corrupt=error."""
  for plan in plans:
    items = plan.items()
    for index, (start, end) in enumerate(shard_ranges(plan.count, plan.shards)):
      chunk = list(itertools.islice(items, end - start))
      if len(chunk) != end - start:
        raise DataError(f'{plan.source} gave {start + len(chunk)} examples, expected {plan.count}')
      path = os.path.join(out, plan.name, shard_name(plan.name, index, plan.shards))
      settings = shard_settings(plan, start, chunk, max_short_side)
      counts = complete_counts(path, settings)
      if counts is None:
        yield ShardTask(plan.name, index, path, chunk, settings, on_corrupt)
        continue
      if on_corrupt == 'error' and counts['skipped_corrupt']:
        raise DataError(corrupt_message(counts['skipped_corrupt'][0]))
      yield {'split': plan.name, 'index': index, 'items': len(chunk), 'reused': True, **counts}


def pool_context():
  """forkserver: workers are forked from a fresh server process that imported this module once,
  not from this process, where TensorFlow may be running threads (tfds reading) that a fork
  would copy mid-flight; and unlike spawn, TensorFlow is not imported again in every worker."""
  if 'forkserver' not in multiprocessing.get_all_start_methods():
    return multiprocessing.get_context('spawn')
  context = multiprocessing.get_context('forkserver')
  context.set_forkserver_preload([write_shard.__module__])
  return context


def finished(done: queue.SimpleQueue) -> dict:
  result = done.get()
  if isinstance(result, BaseException):
    raise result
  return result


def run_steps(steps, workers: int, on_result) -> None:
  """Calls `on_result` with each shard's counts, in completion order: reused ones at once, the
  others as `workers` processes (or this one, for 1) write them. At most 2 x workers tasks are
  in flight, so tfds bytes are read only as fast as they are written."""
  if workers <= 1:
    for step in steps:
      on_result(step if isinstance(step, dict) else write_shard(step))
    return
  done, in_flight = queue.SimpleQueue(), 0
  with pool_context().Pool(workers) as pool:  # on any error: the pool is terminated
    for step in steps:
      if isinstance(step, dict):
        on_result(step)
        continue
      if in_flight == 2 * workers:
        on_result(finished(done))
        in_flight -= 1
      pool.apply_async(write_shard, (step,), callback=done.put, error_callback=done.put)
      in_flight += 1
    for _ in range(in_flight):
      on_result(finished(done))


def progress_bar(total: int):
  """A tqdm bar over images on stderr, or a stand-in that shows nothing without tqdm."""
  try:
    from tqdm import tqdm
  except ImportError:
    import contextlib
    return contextlib.nullcontext(type('NoBar', (), {'update': lambda self, n: None})())
  return tqdm(total=total, unit='img', desc='bigkd.prepare', file=sys.stderr, smoothing=0.1)


# --- The whole run. ---------------------------------------------------------------------------

def merge_counts(plan: SplitPlan, split_results: list[dict]) -> dict:
  """A split's counts from its shards' (in shard order, so info.json is deterministic)."""
  ordered = sorted(split_results, key=lambda r: r['index'])
  return {'num_examples': sum(r['num_examples'] for r in ordered),
          'skipped_corrupt': [name for r in ordered for name in r['skipped_corrupt']],
          'skipped_not_image': plan.skipped,
          'reused_shards': sum(bool(r.get('reused')) for r in ordered)}


def write_infos(out: str, class_names: list[str], plans: list[SplitPlan], counts: dict,
                max_short_side: int) -> None:
  """OUT/{split}/info.json for each split written, then OUT/info.json over every split there."""
  for plan in plans:
    c = counts[plan.name]
    write_json(os.path.join(out, plan.name, 'info.json'), {
        'num_examples': c['num_examples'], 'num_classes': len(class_names),
        'class_names': class_names, 'skipped_corrupt': c['skipped_corrupt'],
        'skipped_not_image': c['skipped_not_image'], 'max_short_side': max_short_side,
        'source': plan.source, 'record_version': RECORD_VERSION,
        'shards': [shard_name(plan.name, i, plan.shards) for i in range(plan.shards)]})
  splits = {}
  for name in sorted(os.listdir(out)):
    if os.path.isfile(os.path.join(out, name, 'info.json')):
      splits[name] = read_info(os.path.join(out, name))['num_examples']
  write_json(os.path.join(out, 'info.json'), {
      'class_names': class_names, 'num_classes': len(class_names), 'splits': splits,
      'record_format': RECORD_FORMAT})


def summary_line(out: str, plans: list[SplitPlan], counts: dict, seconds: float) -> str:
  parts = []
  for plan in plans:
    c = counts[plan.name]
    reused = c['reused_shards'] and f' ({c["reused_shards"]} of {plan.shards} shards reused)'
    parts.append(f'{plan.name} {c["num_examples"]} written / {len(c["skipped_corrupt"])} '
                 f'skipped corrupt / {c["skipped_not_image"]} skipped non-image{reused or ""}')
  return f'bigkd.prepare: {out} in {seconds:.1f} s: ' + '; '.join(parts)


def prepare(out: str, class_names: list[str], plans: list[SplitPlan], max_short_side: int,
            workers: int, on_corrupt: str) -> str:
  """Writes every split's shards and info files; returns the summary line."""
  began = time.time()
  looks_complete = sum(start_split(out, plan) for plan in plans)
  pending = sum(plan.shards for plan in plans) - looks_complete
  results = {plan.name: [] for plan in plans}
  with progress_bar(sum(plan.count for plan in plans)) as bar:
    def on_result(result):
      if 'error' in result:
        raise DataError(result['error'])
      results[result['split']].append(result)
      bar.update(result['items'])
    run_steps(shard_steps(out, plans, max_short_side, on_corrupt), min(workers, pending),
              on_result)
  counts = {plan.name: merge_counts(plan, results[plan.name]) for plan in plans}
  write_infos(out, class_names, plans, counts, max_short_side)
  return summary_line(out, plans, counts, time.time() - began)


def define_flags() -> flags.FlagValues:
  """A fresh set of this command's flags (one per call: `main` can run many times in-process)."""
  fv = flags.FlagValues()
  flags.DEFINE_string('folder', None, 'Image folder ROOT: images under ROOT/{split}/{class}/*.',
                      flag_values=fv)
  flags.DEFINE_string('tfds', None, 'A tfds dataset (NAME[/CONFIG][:VERSION]) already prepared '
                      'in --tfds_data_dir; nothing is downloaded.', flag_values=fv)
  flags.DEFINE_string('tfds_data_dir', None, "tfds data_dir of --tfds (default: tfds's own).",
                      flag_values=fv)
  flags.DEFINE_string('splits', '', 'Comma-separated SRC[=NAME]: source split (a tfds split '
                      'expression, or a folder under ROOT) and output name. Default: train, val, '
                      "test that exist (folder); every split (tfds).", flag_values=fv)
  flags.DEFINE_string('out', None, 'Output folder.', flag_values=fv)
  flags.DEFINE_integer('shards', 0, f'Shards per split; 0: one per ~{IMAGES_PER_SHARD:,} images '
                       '(at least 1).', flag_values=fv)
  flags.DEFINE_integer('max_short_side', 0, 'Resize images whose short side exceeds this to it '
                       '(aspect kept, JPEG quality 95); 0: keep every size.', flag_values=fv)
  flags.DEFINE_integer('workers', min(8, os.cpu_count() or 1), 'Processes writing shards.',
                       flag_values=fv)
  flags.DEFINE_enum('on_corrupt', 'error', ['error', 'skip'], 'A corrupt image: stop with an '
                    'error, or skip it (listed in info.json).', flag_values=fv)
  return fv


def check_flags(fv: flags.FlagValues) -> None:
  if bool(fv.folder) == bool(fv.tfds):
    raise DataError('give one source: --folder ROOT or --tfds NAME')
  if not fv.out:
    raise DataError('--out is required')
  for name in ('shards', 'max_short_side'):
    if fv[name].value < 0:
      raise DataError(f'--{name} must be >= 0, not {fv[name].value}')
  if fv.workers < 1:
    raise DataError(f'--workers must be >= 1, not {fv.workers}')


def main(argv=None):
  argv = argv or sys.argv
  fv = define_flags()
  cli.parse(fv, argv, __doc__)
  try:
    check_flags(fv)
    if fv.folder:
      class_names, plans = folder_plans(fv.folder, fv.splits)
    else:
      class_names, plans = tfds_plans(fv.tfds, fv.tfds_data_dir, fv.splits)
    plans = [plan._replace(shards=fv.shards or default_shards(plan.count)) for plan in plans]
    line = prepare(os.path.abspath(fv.out), class_names, plans, fv.max_short_side, fv.workers,
                   fv.on_corrupt)
  except DataError as e:
    cli.fail(first_line(e))
  print(line, flush=True)
