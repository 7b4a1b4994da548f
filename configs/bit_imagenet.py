"""ImageNet-1k: BiT-M-R152x2 teachers distilled into BiT-R50x1 by function matching (Beyer et al.
2022, "Knowledge distillation: A good teacher is patient and consistent", Sec. 5 / Table 1).

  python -m bigkd.train --config configs/bit_imagenet.py:t384_s224,epochs=1200 --workdir DIR \
      --config.data.data_dir=/path/to/tfds \
      --config.stages.student.teachers.teacher.source=/path/to/R152x2_T_384.npz

Variants (`[PRESET][,epochs=N][,init[=PATH.npz]]`, see bigkd/bit_recipes.py):
  t224_s224       teacher at 224 px, student at 224 px (the default preset)
  t384_s224       teacher at 384 px, student at 224 px (same crop, rendered at each resolution)
  t224_s160       teacher at 224 px, student at 160 px
  t384_t224_s224  the two-teacher ensemble: teachers `t384` (384 px) and `t224` (224 px), student
                  at 224 px; set both sources, e.g.
                    --config.stages.student.teachers.t384.source=/path/to/R152x2_T_384.npz
                    --config.stages.student.teachers.t224.source=/path/to/R152x2_T_224.npz
  epochs=N        training length (default 1200, the released config's "good middle-ground").
                  The paper's ImageNet table reports 300, 1200, 4800 and 9600 epochs (T224->S160:
                  no 4800); 600 is also named as a budget but is not confirmed by our sources.
  init[=PATH]     start the student from a pretrained BiT-R50x1 .npz instead of random weights
                  (e.g. the public BiT-M-R50x1.npz: its 21,843-class head is replaced by a zero
                  1000-class head when loaded).

Teachers: BiT-M-R152x2 (ImageNet-21k pre-trained) fine-tuned on ImageNet at 224 px and at 384 px,
released as R152x2_T_224.npz and R152x2_T_384.npz (gs://bit_models/distill/).

Recipe (paper Sec. 3 + the authors' released config bit_i1k.py): batch 4096, Adam (bfloat16 first
moment), lr 0.03, decoupled weight decay 3e-4 (big_vision's convention, which an lr override
leaves unchanged: see bigkd/bit_recipes.py), 5000 warmup steps then cosine, clip 1.0, KL at
temperature 1, mixup Beta(1, 1), inception crop + flip. Splits as released: train =
train[:98%], val (minival) = train[99%:], test = the ImageNet validation set.

Data are streamed (`data.device_resident=False`): each process reads and decodes only its rows
of every batch, from a tfds data_dir prepared as ArrayRecord or from the ArrayRecord files of
`python -m bigkd.prepare` (`--config.data.source=records --config.data.data_dir=OUT`); host memory
does not grow with the dataset. Each image is resized so its long side is `data.base_size`
(4/3 of the largest model's resolution: 320 for 224 px, 512 for 384 px) with its aspect kept, and
the crop is sampled over the whole image as in the released code (tf.image.sample_distorted_
bounding_box semantics: area 5-100%, aspect 0.75-1.33). Evaluation is the released one: resize_small
then central_crop, 224 of 256 (`data.eval_crop_fraction=0.875`) for every model. On few devices,
lower memory with --config.stages.student.model_kwargs.remat=True or --config.mesh.fsdp=N.
"""
from bigkd import bit_recipes

TEACHER_224 = bit_recipes.placeholder('R152x2_T_224.npz')
TEACHER_384 = bit_recipes.placeholder('R152x2_T_384.npz')

# preset -> (teachers {name: (path, resolution)}, student resolution)
PRESETS = {
    't224_s224': ({'teacher': (TEACHER_224, 224)}, 224),
    't384_s224': ({'teacher': (TEACHER_384, 384)}, 224),
    't224_s160': ({'teacher': (TEACHER_224, 224)}, 160),
    't384_t224_s224': ({'t384': (TEACHER_384, 384), 't224': (TEACHER_224, 224)}, 224),
}
PAPER_EPOCHS = (300, 600, 1200, 4800, 9600)
DEFAULT_EPOCHS = 1200


def get_config(variant=None):
  names, options = bit_recipes.parse_variant(variant, 'configs/bit_imagenet.py',
                                             [('preset', tuple(PRESETS), 't224_s224')])
  teachers, student_resolution = PRESETS[names['preset']]
  return bit_recipes.distill_config(
      dataset='imagenet2012', num_classes=1000,
      splits=('train[:98%]', 'train[99%:]', 'validation'),
      base_size=bit_recipes.canvas_size(max(res for _, res in teachers.values())),
      eval_crop_fraction=224 / 256,  # released: resize_small(256), central_crop(224)
      device_resident=False,
      batch_size=4096,            # paper Sec. 3: 4096 on ImageNet
      eval_batch_size=512,
      teachers=teachers, student_resolution=student_resolution,
      epochs=options.get('epochs', DEFAULT_EPOCHS),
      lr=0.03, paper_wd=3e-4,     # released bit_i1k.py
      temperature=1.0,            # released bit_i1k.py: distance_kw t=1.0
      warmup_steps=5000,          # released bit_i1k.py
      log_every=50, eval_every=10_000, checkpoint_every=1000,
      init=options.get('init', ''),
      # Several teachers: mean of their probabilities (the released trainer sums per-teacher KLs,
      # "the same as using a teacher-ensemble in probs-space" up to a constant factor).
      ensemble='probs')
