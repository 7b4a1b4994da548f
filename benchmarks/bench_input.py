"""Input pipeline at ImageNet scale: bigkd's streamed JPEG reader against a bare tf.data baseline.

Example (the defaults: 20,000 synthetic 500x375 JPEGs, canvas 256 for a 224 px model, 2 threads):
  PYTHONPATH=. .venv/bin/python benchmarks/bench_input.py --workdir /tmp/bench_input \\
      --json /tmp/bench_input/result.json
A quicker look (fewer images and rounds, no digits bench):
  PYTHONPATH=. .venv/bin/python benchmarks/bench_input.py --images 4000 --rss_small 1000 \\
      --rounds 2 --skip c

What it measures (all on the host CPU; the dataset is generated once and cached in --workdir):
 (a) decoded+cropped images/s. bigkd: `StreamedSplit(FolderSource(root, 'train'), canvas)` fed
     through `bigkd.build.streamed_inputs` (grain reader threads, then the transfer to one CPU
     device), with 1 reader thread and with --threads. Each image is read, decoded whole and
     resized so its long side is the canvas: the crop happens later, on the device.
     Baseline: tf.data over the same files, `read_file -> sample_distorted_bounding_box ->
     decode_and_crop_jpeg -> resize(R)` (the classic ImageNet pipeline, which decodes only the
     crop window), with num_parallel_calls and the private thread pool at 1 and at --threads
     (max_intra_op_parallelism 1).
     Both read the same random batches (`host_batch_indices`), in interleaved rounds; the files
     sit in the page cache. Rates: images per wall second, and images per CPU second of this
     process (process_time over all its threads: the per-core figure, less disturbed than wall
     time by other jobs on a shared machine). Also, with --records, the same reader over
     `bigkd.prepare`'s ArrayRecord files, and a per-image cost breakdown of both pipelines.
 (b) peak host RSS (VmHWM; ru_maxrss too) of a fresh process streaming --rss_batches batches through
     `streamed_inputs` over --rss_small images and over --images images (memory should not grow
     with the dataset), and, for contrast, of decoding --in_memory images into host memory
     (`sources.in_memory`).
 (c) `pipeline_ratio` of `python -m bigkd.bench` (pipeline-fed step rate / fixed-batch step
     rate) for the digits student with streamed and with device-resident input, and for a
     cnn_small stage at --folder_stage_resolution streamed from the JPEG folder (on a CPU host the
     reader and the step share the cores).
"""
import argparse
import io
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DATASET_VERSION = 1  # bump when the generator changes: cached datasets are then regenerated
NOISE_SIDE = 1024
_noise = None  # per worker: a bank of film grain, sliced at random offsets


# --- (0) The synthetic dataset. ---------------------------------------------------------------

def synthetic_jpeg(seed: int, width: int, height: int, quality: int) -> bytes:
  """A photo-like JPEG: smooth multi-scale colour fields, a few flat shapes (edges), film grain.
  Pure noise would compress badly and decode unlike a photo; this lands near 70-80 KB at
  500x375, quality 90 (ImageNet's JPEGs average about 110 KB)."""
  from PIL import Image, ImageDraw
  global _noise
  if _noise is None:
    _noise = np.random.default_rng(12345).normal(0, 1, (NOISE_SIDE, NOISE_SIDE, 3)).astype(
        np.float32)
  rng = np.random.default_rng(seed)
  low_w, low_h = width // 4, height // 4
  low = np.full((low_h, low_w, 3), 128, np.float32)
  for cells, amplitude in ((2, 50), (5, 35), (14, 25), (40, 15)):  # coarse to fine octaves
    grid = rng.normal(0, amplitude, (max(2, cells * low_h // low_w), max(2, cells), 3))
    grid = np.clip(128 + grid, 0, 255).astype(np.uint8)
    low += np.asarray(Image.fromarray(grid).resize((low_w, low_h), Image.BICUBIC),
                      np.float32) - 128
  image = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((width, height),
                                                                        Image.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(8):
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    box = (x0, y0, x0 + int(rng.integers(10, 150)), y0 + int(rng.integers(10, 150)))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  oy, ox = int(rng.integers(0, NOISE_SIDE - height)), int(rng.integers(0, NOISE_SIDE - width))
  pixels = np.asarray(image, np.float32) + 12.0 * _noise[oy:oy + height, ox:ox + width]
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, 'JPEG', quality=quality)
  return out.getvalue()


def image_path(root: str, index: int, classes: int) -> str:
  return os.path.join(root, 'train', f'class_{index % classes:03d}', f'img_{index:06d}.jpg')


def write_images(task):
  """Worker: writes images [start, stop) of the dataset; every 4th one is portrait."""
  root, start, stop, classes, seed, quality = task
  total = 0
  for i in range(start, stop):
    width, height = (375, 500) if i % 4 == 3 else (500, 375)
    data = synthetic_jpeg(seed * 1_000_003 + i, width, height, quality)
    with open(image_path(root, i, classes), 'wb') as f:
      f.write(data)
    total += len(data)
  return total


def ensure_dataset(workdir, images, classes, quality, seed, workers):
  """`workdir/jpeg_{images}`: an image folder `train/class_XXX/img_XXXXXX.jpg`, generated in
  parallel once; reused while its description (dataset.json) matches."""
  root = os.path.join(workdir, f'jpeg_{images}')
  spec = dict(version=DATASET_VERSION, images=images, classes=classes, quality=quality,
              seed=seed)
  marker = os.path.join(root, 'dataset.json')
  if os.path.exists(marker):
    with open(marker) as f:
      done = json.load(f)
    if {k: done.get(k) for k in spec} == spec:
      print(f'dataset: {images} JPEGs cached in {root} ({done["mean_kb"]:.1f} KB mean, '
            f'generated in {done["seconds"]:.0f} s)', flush=True)
      return root, done
  shutil.rmtree(root, ignore_errors=True)
  for c in range(classes):
    os.makedirs(os.path.join(root, 'train', f'class_{c:03d}'))
  chunk = 250
  tasks = [(root, s, min(images, s + chunk), classes, seed, quality)
           for s in range(0, images, chunk)]
  print(f'dataset: generating {images} JPEGs (500x375 and 375x500, quality {quality}) in {root} '
        f'with {workers} processes', flush=True)
  start = time.perf_counter()
  with multiprocessing.get_context('fork').Pool(workers) as pool:
    total = sum(pool.imap_unordered(write_images, tasks))
  done = dict(spec, seconds=time.perf_counter() - start, mean_kb=total / images / 1e3)
  with open(marker, 'w') as f:
    json.dump(done, f)
  print(f'dataset: {images} JPEGs, {done["mean_kb"]:.1f} KB mean, {done["seconds"]:.0f} s',
        flush=True)
  return root, done


def subset_folder(workdir, root, images, subset, classes):
  """An image folder of the dataset's first `subset` images (symbolic links, balanced classes)."""
  sub = os.path.join(workdir, f'jpeg_{images}_first_{subset}')
  marker = os.path.join(sub, 'done')
  if not os.path.exists(marker):
    shutil.rmtree(sub, ignore_errors=True)
    for c in range(classes):
      os.makedirs(os.path.join(sub, 'train', f'class_{c:03d}'))
    for i in range(subset):
      os.symlink(image_path(root, i, classes), image_path(sub, i, classes))
    open(marker, 'w').close()
  return sub


def ensure_records(workdir, root, images, workers):
  """`python -m bigkd.prepare --folder root` once (JPEGs kept byte for byte); the output folder,
  or None (with the reason printed) when bigkd.prepare is not usable."""
  out = os.path.join(workdir, f'records_{images}')
  if os.path.exists(os.path.join(out, 'train', 'info.json')):
    return out
  print(f'records: python -m bigkd.prepare --folder {root} --out {out}', flush=True)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, '-m', 'bigkd.prepare', '--folder', root, '--out', out,
                         '--workers', str(workers)], cwd=REPO, env=child_env(),
                        capture_output=True, text=True)
  if proc.returncode:
    print(f'records: bigkd.prepare failed (exit {proc.returncode}), folder source only: '
          f'{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}', flush=True)
    return None
  print(f'records: prepared in {time.perf_counter() - start:.0f} s', flush=True)
  return out


def child_env():
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
              TF_CPP_MIN_LOG_LEVEL=os.environ.get('TF_CPP_MIN_LOG_LEVEL', '2'))


def warm_page_cache(paths):
  """Reads every file once, so that no variant pays the first read from disk."""
  total = 0
  for path in paths:
    with open(path, 'rb') as f:
      total += len(f.read())
  return total


# --- (a) Throughput. ---------------------------------------------------------------------------

def cpu_device_sharding():
  import jax
  from bigkd.sharding import batch_sharding, make_mesh
  return batch_sharding(make_mesh(1, 1, devices=jax.devices('cpu')[:1]))


def bigkd_round(split, sharding, seed, batch, first_step, batches, threads):
  """Streams steps [first_step, first_step + batches) through bigkd's reader; images read."""
  import jax
  from bigkd.build import streamed_inputs
  count = 0
  for images, _, _ in streamed_inputs(split, seed, batch, sharding, first_step,
                                      first_step + batches, num_threads=threads):
    jax.block_until_ready(images)
    count += images.shape[0]
  return count


def baseline_map(resolution):
  """The bare ImageNet train map: a random crop window decoded alone, resized to R."""
  import tensorflow as tf

  def load(path, label):
    data = tf.io.read_file(path)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(data), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(size)
    image = tf.image.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, (resolution, resolution), method='bilinear')
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

  return load


def baseline_round(paths, labels, indices, load, batch, threads):
  """The tf.data baseline over the files of `indices` (in that order); images produced."""
  import tensorflow as tf
  ds = tf.data.Dataset.from_tensor_slices((paths[indices], labels[indices]))
  ds = ds.map(load, num_parallel_calls=threads).batch(batch)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  count = 0
  for images, _ in ds:
    count += int(images.shape[0])
  return count


def measure_throughput(args, root, records_root):
  """Interleaved rounds of every variant over the same batches; best round per variant."""
  from bigkd.data import sources
  from bigkd.data.sampling import host_batch_indices
  folder = sources.FolderSource(root, 'train')
  paths, labels = np.asarray(folder.paths), folder.labels
  mb = warm_page_cache(folder.paths) / 1e6
  print(f'(a) {len(folder)} files ({mb:.0f} MB) read once into the page cache', flush=True)
  sharding = cpu_device_sharding()
  load = baseline_map(args.resolution)
  splits = {'folder': sources.StreamedSplit(folder, args.canvas)}
  if records_root:
    splits['records'] = sources.StreamedSplit(sources.RecordSource(records_root, 'train'),
                                              args.canvas)
  thread_counts = sorted({1, args.threads})
  variants = {}
  for name, split in splits.items():
    for t in thread_counts:
      variants[f'bigkd {name} x{t}'] = ('bigkd', split, t)
  for t in thread_counts:
    variants[f'tf.data x{t}'] = ('tf.data', None, t)

  def run(kind, split, threads, first_step, batches):
    if kind == 'bigkd':
      return bigkd_round(split, sharding, args.seed, args.batch, first_step, batches, threads)
    indices = np.concatenate([host_batch_indices(args.seed, s, args.batch, len(folder))
                              for s in range(first_step, first_step + batches)])
    return baseline_round(paths, labels, indices, load, args.batch, threads)

  for kind, split, threads in variants.values():  # warm-up: tracing, TF kernels, grain
    run(kind, split, threads, 10 ** 6, 2)
  names = list(variants)
  rounds = {name: [] for name in names}
  for r in range(args.rounds):
    first_step = r * args.round_batches  # every variant reads the same images in a round
    for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
      wall, cpu = time.perf_counter(), time.process_time()
      count = run(*variants[name], first_step, args.round_batches)
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
      rounds[name].append((count, wall, cpu))
      print(f'  round {r + 1}/{args.rounds}  {name:20s} {count / wall:8.1f} img/s  '
            f'{count / cpu:8.1f} img/CPU-s', flush=True)
  results = {}
  for name, runs in rounds.items():
    kind, _, threads = variants[name]
    count = runs[0][0]
    results[name] = dict(kind=kind, threads=threads, images_per_round=count,
                         img_per_s=count / min(w for _, w, _ in runs),
                         img_per_cpu_s=count / min(c for _, _, c in runs),
                         median_img_per_s=count / float(np.median([w for _, w, _ in runs])),
                         cores_busy=float(np.median([c / w for _, w, c in runs])))
  return results


def canvas_shape(shape, canvas):
  """(h, w) with the long side at `canvas`, as `fit_to_canvas` computes it."""
  scale = canvas / max(shape[:2])
  return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def pil_fit(blob, canvas):
  """A reference, not bigkd's code: decode with PIL and resize (antialiased bilinear) in uint8."""
  from PIL import Image
  image = Image.open(io.BytesIO(blob)).convert('RGB')
  h, w = canvas_shape((image.height, image.width), canvas)
  return np.asarray(image.resize((w, h), Image.BILINEAR))


def cost_breakdown(root, canvas, resolution, n):
  """Mean CPU ms per image of the steps of both pipelines, one image at a time, in this thread.
  bigkd's steps are timed through its public functions (`StreamedSplit.rows`, `fit_to_canvas`,
  and `decode_to_canvas` where this version of sources.py has it); the rest are references."""
  import tensorflow as tf
  from bigkd.data import sources
  folder = sources.FolderSource(root, 'train')
  index = np.random.default_rng(1).choice(len(folder), n, replace=False)
  blobs = [folder[int(i)][0] for i in index]
  batches = [index[b:b + 64] for b in range(0, n - 63, 64)]

  def cpu_ms(fn, items, per=1):
    fn(items[0])  # warm-up: tracing, first kernels
    start = time.process_time()
    out = [fn(x) for x in items]
    return 1e3 * (time.process_time() - start) / len(items) / per, out

  def crop_box(blob):
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(blob), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])

  def tf_resize(im, antialias):
    return tf.cast(tf.image.resize(im, canvas_shape(im.shape, canvas), antialias=antialias),
                   tf.uint8)

  steps = {}
  steps['read file'], _ = cpu_ms(lambda i: folder[int(i)], index)
  steps['decode whole JPEG (tf.io.decode_jpeg)'], images = cpu_ms(
      lambda b: tf.io.decode_jpeg(b, channels=3).numpy(), blobs)
  steps['bigkd: fit_to_canvas(decoded image)'], _ = cpu_ms(
      lambda im: sources.fit_to_canvas(im, canvas), images)
  if hasattr(sources, 'decode_to_canvas'):
    steps['bigkd: decode_to_canvas(JPEG bytes)'], _ = cpu_ms(
        lambda b: sources.decode_to_canvas(b, canvas), blobs)
  steps['bigkd: StreamedSplit.rows (per image, batches of 64)'], _ = cpu_ms(
      sources.StreamedSplit(folder, canvas).rows, batches, per=64)
  boxes = [crop_box(b) for b in blobs]
  steps['baseline: decode_and_crop_jpeg (crop window)'], crops = cpu_ms(
      lambda bb: tf.image.decode_and_crop_jpeg(bb[0], bb[1], channels=3),
      list(zip(blobs, boxes)))
  steps['baseline: resize crop to R (bilinear)'], _ = cpu_ms(
      lambda im: tf.cast(tf.image.resize(im, (resolution, resolution)), tf.uint8), crops)
  steps['reference: TF resize to canvas, antialiased'], _ = cpu_ms(
      lambda im: tf_resize(im, True), images)
  steps['reference: TF resize to canvas, plain bilinear'], _ = cpu_ms(
      lambda im: tf_resize(im, False), images)
  steps['reference: PIL decode + antialiased resize (uint8)'], _ = cpu_ms(
      lambda b: pil_fit(b, canvas), blobs)
  return steps


def code_version():
  """What was measured: the commit, and a hash of the reader's files (uncommitted changes)."""
  import hashlib

  def git(*cmd):
    proc = subprocess.run(['git', *cmd], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip()

  files = ['bigkd/data/sources.py', 'bigkd/build.py', 'bigkd/tf_quiet.py']
  digest = hashlib.sha1()
  for name in files:
    with open(os.path.join(REPO, name), 'rb') as f:
      digest.update(f.read())
  return dict(commit=git('rev-parse', '--short', 'HEAD'),
              reader_changed=bool(git('status', '--porcelain', '--', *files)),
              reader_sha1=digest.hexdigest()[:10])


# --- (b) Peak host memory, each measurement in a fresh process. --------------------------------

def peak_rss_mb():
  """(VmHWM, ru_maxrss) in MB. VmHWM is the peak RSS of this process's own address space;
  ru_maxrss also carries the parent's peak at fork/exec time (Linux keeps the larger), so it is
  only clean when the parent is small (part (b) runs before anything big is imported)."""
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  try:
    with open('/proc/self/status') as f:
      hwm = next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')) / 1024
  except (OSError, StopIteration):
    hwm = maxrss
  return hwm, maxrss


def rss_child(args):
  """Runs in a fresh process: streams (or, with --_in_memory, decodes) and prints one JSON line
  with its peak RSS."""
  import jax
  from bigkd.build import streamed_inputs
  from bigkd.data import sources
  jax.devices()
  import tensorflow as tf  # noqa: F401  (imported by the reader anyway: count it in the base)
  folder = sources.FolderSource(args._rss_child, 'train')
  base_mb, _ = peak_rss_mb()
  start = time.perf_counter()
  if args._in_memory:
    split = sources.in_memory(folder, args.canvas)
    images = len(split)
  else:
    split = sources.StreamedSplit(folder, args.canvas)
    images = 0
    for batch, _, _ in streamed_inputs(split, args.seed, args.batch, cpu_device_sharding(), 0,
                                       args.rss_batches, num_threads=args.threads):
      jax.block_until_ready(batch)
      images += batch.shape[0]
  peak_mb, maxrss_mb = peak_rss_mb()
  print(json.dumps(dict(dataset=len(folder), images=images, base_mb=base_mb, peak_mb=peak_mb,
                        ru_maxrss_mb=maxrss_mb,
                        seconds=time.perf_counter() - start)), flush=True)


def measure_rss(args, root, dataset_images, in_memory=False):
  cmd = [sys.executable, os.path.abspath(__file__), '--_rss_child', root, '--canvas',
         str(args.canvas), '--batch', str(args.batch), '--threads', str(args.threads),
         '--rss_batches', str(args.rss_batches), '--seed', str(args.seed)]
  if in_memory:
    cmd.append('--_in_memory')
  proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'RSS child failed ({proc.returncode}): {proc.stderr[-2000:]}')
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  what = (f'decode all {result["images"]} into memory' if in_memory else
          f'stream {result["images"]} images')
  print(f'(b) {dataset_images:6d}-image folder, {what}: peak RSS {result["peak_mb"]:.0f} MB '
        f'(after imports {result["base_mb"]:.0f} MB; ru_maxrss {result["ru_maxrss_mb"]:.0f} MB), '
        f'{result["seconds"]:.0f} s', flush=True)
  return result


# --- (c) bigkd.bench's pipeline_ratio. ---------------------------------------------------------

def run_bench(name, overrides, steps, workdir):
  out = os.path.join(workdir, f'bench_{name}.json')
  cmd = [sys.executable, '-m', 'bigkd.bench', '--config', 'configs/digits.py', *overrides,
         '--steps', str(steps), '--json', out]
  print(f'(c) {name}: {" ".join(cmd[1:])}', flush=True)
  proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
  if proc.returncode:
    print(f'(c) {name} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}',
          flush=True)
    return dict(error=proc.stderr.strip().splitlines()[-1:], command=' '.join(cmd[1:]))
  with open(out) as f:
    result = json.load(f)
  result['command'] = ' '.join(cmd[1:])
  print('    ' + '\n    '.join(proc.stdout.strip().splitlines()), flush=True)
  return result


# --- The run. -----------------------------------------------------------------------------------

def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0], epilog=__doc__.split('\n\n')[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'bench_input'),
                      help='where the synthetic dataset (and ArrayRecords) are cached')
  parser.add_argument('--images', type=int, default=20000, help='JPEGs in the dataset')
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--quality', type=int, default=90, help='JPEG quality')
  parser.add_argument('--workers', type=int, default=os.cpu_count(),
                      help='processes that generate (and prepare) the dataset')
  parser.add_argument('--canvas', type=int, default=256, help="bigkd's canvas (data.base_size)")
  parser.add_argument('--resolution', type=int, default=224, help="the baseline's output size")
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--threads', type=int, default=2,
                      help='reader threads / num_parallel_calls of the parallel variants')
  parser.add_argument('--rounds', type=int, default=5, help='(a) timed rounds per variant')
  parser.add_argument('--round_batches', type=int, default=8, help='(a) batches per round')
  parser.add_argument('--records', action=argparse.BooleanOptionalAction, default=True,
                      help='(a) also time the reader over bigkd.prepare ArrayRecords')
  parser.add_argument('--breakdown_images', type=int, default=128,
                      help='(a) images for the per-step cost breakdown; 0: skip')
  parser.add_argument('--rss_small', type=int, default=5000,
                      help='(b) the small dataset (first N images) to compare with --images')
  parser.add_argument('--rss_batches', type=int, default=300, help='(b) batches streamed')
  parser.add_argument('--in_memory', type=int, default=-1,
                      help='(b) also decode the first N images into memory (contrast); '
                      '-1: --rss_small; 0: skip')
  parser.add_argument('--bench_steps', type=int, default=200, help='(c) bigkd.bench --steps')
  parser.add_argument('--folder_stage_resolution', type=int, default=64,
                      help='(c) also bench a cnn_small stage at this resolution streamed from '
                      'the JPEG folder (canvas --canvas, --threads reader threads); 0: skip')
  parser.add_argument('--folder_stage_steps', type=int, default=20)
  parser.add_argument('--skip', default='', help='parts to skip, e.g. "b,c"')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default='', help='write every result to this JSON file')
  parser.add_argument('--_rss_child', default='', help=argparse.SUPPRESS)
  parser.add_argument('--_in_memory', action='store_true', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def verdict(ok):
  return 'met' if ok else 'NOT met'


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if args._rss_child:
    return rss_child(args)
  skip = set(filter(None, (s.strip() for s in args.skip.split(','))))
  os.makedirs(args.workdir, exist_ok=True)
  started = time.perf_counter()
  result = dict(args={k: v for k, v in vars(args).items() if not k.startswith('_')},
                cpu_count=os.cpu_count(), load_average_start=os.getloadavg(),
                code=code_version())
  root, result['dataset'] = ensure_dataset(args.workdir, args.images, args.classes,
                                           args.quality, args.seed, args.workers)
  summaries = {'a': [], 'b': [], 'c': []}  # printed in this order

  # (b) first: this process is still small, so its children's ru_maxrss is clean too.
  if 'b' not in skip:
    summary = summaries['b']
    small = subset_folder(args.workdir, root, args.images, args.rss_small, args.classes)
    b = result['rss'] = {'small': measure_rss(args, small, args.rss_small),
                         'large': measure_rss(args, root, args.images)}
    ratio = b['large']['peak_mb'] / b['small']['peak_mb']
    b['ratio'] = ratio
    summary.append(f'(b) peak RSS streaming {args.rss_batches} batches of {args.batch} '
                   f'({args.threads} reader threads), fresh process each:')
    summary.append(f'    {args.rss_small:6d} images: {b["small"]["peak_mb"]:7.0f} MB   '
                   f'{args.images:6d} images: {b["large"]["peak_mb"]:7.0f} MB   ratio '
                   f'{ratio:.3f} (goal <= 1.10: {verdict(ratio <= 1.10)})')
    summary.append(f'    (peak = VmHWM; after imports {b["small"]["base_mb"]:.0f} / '
                   f'{b["large"]["base_mb"]:.0f} MB; ru_maxrss {b["small"]["ru_maxrss_mb"]:.0f} / '
                   f'{b["large"]["ru_maxrss_mb"]:.0f} MB)')
    in_memory = args.rss_small if args.in_memory < 0 else args.in_memory
    if in_memory:
      sub = subset_folder(args.workdir, root, args.images, in_memory, args.classes)
      b['in_memory'] = measure_rss(args, sub, in_memory, in_memory=True)
      summary.append(f'    contrast: {in_memory} images decoded into host memory '
                     f'(sources.in_memory): {b["in_memory"]["peak_mb"]:.0f} MB peak, '
                     f'{b["in_memory"]["seconds"]:.0f} s')
    summary.append(f'    (canvases alone: {args.rss_small} x {args.canvas}^2 x 3 B = '
                   f'{args.rss_small * args.canvas ** 2 * 3 / 2 ** 20:.0f} MB, {args.images}: '
                   f'{args.images * args.canvas ** 2 * 3 / 2 ** 20:.0f} MB if held in memory)')

  if 'a' not in skip:
    summary = summaries['a']
    records_root = ensure_records(args.workdir, root, args.images, args.workers) \
        if args.records else None
    result['records_usable'] = bool(records_root) if args.records else None
    a = result['throughput'] = measure_throughput(args, root, records_root)
    one, many = 'x1', f'x{args.threads}'
    per_core = a[f'bigkd folder {one}']['img_per_cpu_s'] / a[f'tf.data {one}']['img_per_cpu_s']
    wall_one = a[f'bigkd folder {one}']['img_per_s'] / a[f'tf.data {one}']['img_per_s']
    wall_many = a[f'bigkd folder {many}']['img_per_s'] / a[f'tf.data {many}']['img_per_s']
    result['ratios'] = dict(per_core_cpu=per_core, wall_1_thread=wall_one,
                            wall_threads=wall_many)
    summary.append(f'(a) decoded+cropped images/s, {args.images} JPEGs, batch {args.batch}, '
                   f'bigkd canvas {args.canvas} vs tf.data crop -> {args.resolution}; best of '
                   f'{args.rounds} rounds of {args.round_batches * args.batch} images')
    summary.append(f'    {"variant":22s} {"img/s":>8s} {"img/CPU-s":>10s} {"cores busy":>11s}')
    for name, r in a.items():
      summary.append(f'    {name:22s} {r["img_per_s"]:8.1f} {r["img_per_cpu_s"]:10.1f} '
                     f'{r["cores_busy"]:11.2f}')
    summary.append(f'    bigkd/baseline per core (img per CPU-s, 1 thread): {per_core:.3f}  '
                   f'(goal >= 0.8: {verdict(per_core >= 0.8)})')
    summary.append(f'    bigkd/baseline wall, 1 thread: {wall_one:.3f};  {args.threads} threads: '
                   f'{wall_many:.3f}')
    summary.append('    (bigkd decodes each whole JPEG and resizes it to the canvas, the crop '
                   'coming later on the device; the baseline decodes only its crop window)')
    if args.records and not records_root:
      summary.append('    records: bigkd.prepare was not usable; folder source only')
    if args.breakdown_images:
      steps = result['breakdown_cpu_ms'] = cost_breakdown(root, args.canvas, args.resolution,
                                                          args.breakdown_images)
      summary.append(f'    CPU ms per image, one at a time ({args.breakdown_images} images):')
      summary.extend(f'      {k:54s} {v:7.2f}' for k, v in steps.items())

  if 'c' not in skip:
    summary = summaries['c']
    c = result['bench'] = {}
    for name, resident in (('digits_streamed', False), ('digits_resident', True)):
      c[name] = run_bench(name, [f'--config.data.device_resident={resident}'],
                          args.bench_steps, args.workdir)
    if args.folder_stage_resolution:
      c['folder_stage'] = run_bench('folder_stage', [
          '--config.data.source=folder', f'--config.data.data_dir={root}',
          '--config.data.device_resident=False', f'--config.data.base_size={args.canvas}',
          '--config.data.val_split=train', '--config.data.test_split=train',
          f'--config.data.reader_threads={args.threads}', '--config.stage_order=baseline',
          f'--config.stages.baseline.resolution={args.folder_stage_resolution}'],
          args.folder_stage_steps, args.workdir)
    summary.append('(c) bigkd.bench pipeline_ratio (pipeline-fed / fixed-batch step rate):')
    for name, r in c.items():
      if 'pipeline_ratio' not in r:
        summary.append(f'    {name:16s} failed: {r["error"]}')
        continue
      goal = (f'  (goal >= 0.95: {verdict(r["pipeline_ratio"] >= 0.95)})'
              if name == 'digits_streamed' else '')
      steps = args.folder_stage_steps if name == 'folder_stage' else args.bench_steps
      summary.append(f'    {name:16s} {r["model"]}@{r["resolution"]} batch {r["batch_size"]}, '
                     f'{steps} steps: '
                     f'pipeline {r["images_per_sec"]:8.1f} img/s, fixed '
                     f'{r["fixed_images_per_sec"]:8.1f} img/s, pipeline_ratio '
                     f'{r["pipeline_ratio"]:.3f}{goal}')

  result['seconds'] = time.perf_counter() - started
  result['load_average_end'] = os.getloadavg()
  print('\n=== bench_input summary ===', flush=True)
  code = result['code']
  print(f'machine: {os.cpu_count()} CPU cores; load average at start '
        f'{result["load_average_start"][0]:.2f}, at end {result["load_average_end"][0]:.2f}; '
        f'{result["seconds"]:.0f} s in all')
  print(f'bigkd: commit {code["commit"]}, reader files (sources.py, build.py, tf_quiet.py) sha1 '
        f'{code["reader_sha1"]}{" (uncommitted changes)" if code["reader_changed"] else ""}')
  print('\n'.join(line for part in 'abc' for line in summaries[part]), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
