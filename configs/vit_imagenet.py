"""ImageNet-1k: a ViT-B/16 teacher distilled into a ViT-S/16 student by function matching, with
the schedule of Beyer et al. 2022 ("Knowledge distillation: A good teacher is patient and
consistent"; their recipe of configs/bit_imagenet.py with ViTs in place of the ResNets).

  python -m bigkd.train --config configs/vit_imagenet.py:b16_384_s16_224,epochs=1200 --workdir DIR \
      --config.data.data_dir=/path/to/tfds \
      --config.stages.student.teachers.teacher.source=/path/to/B_16-...-res_384.npz

  bigkd-plan --config configs/vit_imagenet.py:b16_384_s16_224 --target v5e-16 \
      --train_examples 1255544

Variants (`[PRESET][,epochs=N][,init[=PATH.npz]]`):
  b16_384_s16_224  teacher ViT-B/16 at 384 px, student ViT-S/16 at 224 px (the default preset;
                   the same crop box rendered at each resolution)
  b16_224_s16_224  teacher ViT-B/16 at 224 px, student ViT-S/16 at 224 px
  epochs=N         training length (default 1200, as configs/bit_imagenet.py)
  init[=PATH]      start the student from an AugReg ViT-S/16 .npz (e.g. the ImageNet-21k one; its
                   head is replaced by a zero 1000-class head, its position embedding resized to
                   the student's 14 x 14 patch grid when the file's differs)

Teachers: AugReg ViT-B/16 (Steiner et al. 2021, "How to train your ViT?"), pre-trained on
ImageNet-21k and fine-tuned on ImageNet-1k at 384 or 224 px, as released in the AugReg .npz
layout (bigkd/models/vit.py reads it; a file at another resolution is read with its position
embedding resized bilinearly to the teacher's patch grid).

Recipe: the paper's ImageNet distillation (Sec. 3 and its released bit_i1k.py, as in
configs/bit_imagenet.py): batch 4096, function matching (one inception crop, flip and mixup
Beta(1, 1) shared by teacher and student), KL at temperature 1, Adam with a bfloat16 first
moment, clip 1.0, linear warmup then cosine, train = train[:98%], val = train[99%:], test = the
ImageNet validation set, evaluation resize_small(256) + central_crop(224), teacher inference and
student compute in bfloat16. The paper distils ResNets only; its learning rate (0.03, for
BiT-R50x1) is not one for a ViT, so lr, weight decay and warmup are those of big_vision's
ImageNet ViT-S/16 recipe (vit_i1k.py: lr 1e-3, decoupled weight decay 1e-4 in big_vision's
convention, 10k warmup steps). Not tuned for distillation here.
"""
from bigkd import bit_recipes

PLACEHOLDER_DIR = '/path/to/vit_models'
TEACHER_MODEL, STUDENT_MODEL = 'vit_b16', 'vit_s16'
# AugReg's ImageNet-1k fine-tunes of the ImageNet-21k ViT-B/16, named as released.
AUGREG_B16 = ('B_16-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-'
              'lr_0.01-res_{}.npz')
STUDENT_INIT = 'S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz'  # ImageNet-21k

# preset -> (teacher resolution, student resolution)
PRESETS = {'b16_384_s16_224': (384, 224), 'b16_224_s16_224': (224, 224)}
DEFAULT_EPOCHS = 1200


def get_config(variant=None):
  names, options = bit_recipes.parse_variant(
      variant, 'configs/vit_imagenet.py', [('preset', tuple(PRESETS), 'b16_384_s16_224')],
      init_default=f'{PLACEHOLDER_DIR}/{STUDENT_INIT}')
  teacher_resolution, student_resolution = PRESETS[names['preset']]
  teacher = f'{PLACEHOLDER_DIR}/{AUGREG_B16.format(teacher_resolution)}'
  return bit_recipes.distill_config(
      dataset='imagenet2012', num_classes=1000,
      splits=('train[:98%]', 'train[99%:]', 'validation'),
      base_size=bit_recipes.canvas_size(max(teacher_resolution, student_resolution)),
      eval_crop_fraction=224 / 256,
      device_resident=False,
      batch_size=4096,            # the paper's ImageNet batch
      eval_batch_size=512,
      teachers={'teacher': (teacher, teacher_resolution)},
      student_resolution=student_resolution,
      epochs=options.get('epochs', DEFAULT_EPOCHS),
      lr=1e-3, paper_wd=1e-4,     # big_vision vit_i1k.py (the paper's 0.03 / 3e-4 are BiT's)
      temperature=1.0,            # the paper's ImageNet KL temperature
      warmup_steps=10_000,        # big_vision vit_i1k.py
      log_every=50, eval_every=10_000, checkpoint_every=1000,
      init=options.get('init', ''),
      teacher_model=TEACHER_MODEL, student_model=STUDENT_MODEL)
