"""Model registry: name -> flax.linen module.

Every model takes NHWC float images in [-1, 1] and returns float32 logits:
    model = get_model('resnet8x4', num_classes=10)
    logits = model.apply({'params': params}, images)
Parameters are a plain pytree (no batch statistics): models use GroupNorm, not BatchNorm, so
that they shard, checkpoint and load from .npz simply, and teacher forward needs no mutable state.

Every model also sows named intermediate features into Flax's 'intermediates' collection, for
feature- and relation-based distillation: `stage1`, `stage2`, ... (the output of each stage, i.e.
block group, [B, H, W, C]; a ViT's are `block1`, `block2`, ..., its patch tokens on their grid)
and `prelogits` (the embedding the classifier head reads, [B, D]).
Each model's module docstring lists its names and shapes. A plain `apply` is unchanged (the
collection is not mutable there, so sowing is a no-op) and `init` returns only 'params'.
To read them:
    logits, feats = features(model, params, images, ['stage2', 'prelogits'])
The CIFAR ResNets, the small CNNs and BiT also run from a tap: `model.apply({'params': params},
feature, from_tap='stage1')` is what the full model computes after its `stage1` tap
(`runs_from_tap(name)` says whether a model can).
"""
from bigkd.models.registry import feature_shapes, features, get_model, model_names, param_shapes, \
    register, runs_from_tap  # noqa: F401
from bigkd.models import bit, cifar, vit  # noqa: E402,F401  (register bit_*, cnn_*, resnet*, vit_*)
