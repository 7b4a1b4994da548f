"""Notebook helpers: open a finished (or running) run and use its models.

    run = inspect.load_run('runs/digits')
    run.summary['stages']['student'], run.metrics['student'][-1]
    model, params = inspect.load_stage_model('runs/digits/student')
    logits = inspect.predict('runs/digits/student', images_uint8)
"""
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bigkd import checkpoint
from bigkd.build import param_targets
from bigkd.data import augment
from bigkd.models import get_model
from bigkd.sharding import make_mesh


class Run(NamedTuple):
  config: dict
  summary: dict | None
  metrics: dict  # stage name -> list of logged records


def load_run(workdir: str) -> Run:
  def read_json(path):
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  metrics = {}
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name, 'metrics.jsonl')
    if os.path.exists(path):
      with open(path) as f:
        metrics[name] = [json.loads(line) for line in f if line.strip()]
  return Run(read_json(os.path.join(workdir, 'config.json')),
             read_json(os.path.join(workdir, 'summary.json')), metrics)


def load_stage_model(stage_dir: str):
  """(linen module, params of the latest checkpoint) of a stage folder, on one device."""
  info = checkpoint.read_stage_info(stage_dir)
  kwargs = info.get('model_kwargs', {})
  model = get_model(info['model'], info['num_classes'], **kwargs)
  mesh = make_mesh(1, 1, jax.devices()[:1])
  target = param_targets(info['model'], kwargs, info['num_classes'], info['resolution'],
                           jnp.float32, mesh)
  return model, checkpoint.load_params(stage_dir, target, stage_dir)


def predict(stage_dir: str, images):
  """Logits of a stage's model for uint8 images [N, H, W, 3] (whole images, resized)."""
  model, params = load_stage_model(stage_dir)
  resolution = checkpoint.read_stage_info(stage_dir)['resolution']
  views = augment.render_boxes(jnp.asarray(images), augment.full_boxes(len(images)), resolution)
  return jax.jit(model.apply)({'params': params}, views)
