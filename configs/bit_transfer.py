"""Flowers102, Pets, Food101 and SUN397: BiT-M-R152x2 distilled into BiT-R50x1 by function matching
(Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent", Fig. 3 /
Tab. 4). ImageNet is configs/bit_imagenet.py; the shared recipe is bigkd/bit_recipes.py.

Variant: `DATASET[,BUDGET][,epochs=N][,init[=PATH.npz]]`
  DATASET      flowers | pets | food | sun (required)
  BUDGET       fast (the default) | medium | long: the released settings in the table below
  epochs=N     replaces the budget's training length (keeping its lr, weight decay, temperature)
  init[=PATH]  starts the student from a pretrained BiT-R50x1 .npz instead of random weights (the
               paper's transfer-initialised student). The file's head is replaced by a zero head
               for the dataset's classes when loaded, so the public 21,843-class BiT-M-R50x1.npz
               works as is. A bare `init` is a placeholder path, rejected by the trainer until
               overridden: --config.stages.student.init=/path/to/BiT-M-R50x1.npz
An unknown dataset, budget or option is a ValueError naming the allowed values (exit code 2).

Commands (the fast budget; write e.g. `flowers,long` for another):

  python -m bigkd.train --config configs/bit_transfer.py:flowers,fast --workdir DIR \
      --config.data.data_dir=/path/to/tfds \
      --config.stages.student.teachers.teacher.source=/path/to/R152x2_T_flowers128.npz
  python -m bigkd.train --config configs/bit_transfer.py:pets,fast --workdir DIR \
      --config.data.data_dir=/path/to/tfds \
      --config.stages.student.teachers.teacher.source=/path/to/R152x2_T_pet128.npz
  python -m bigkd.train --config configs/bit_transfer.py:food,fast --workdir DIR \
      --config.data.data_dir=/path/to/tfds \
      --config.stages.student.teachers.teacher.source=/path/to/R152x2_T_food128.npz
  python -m bigkd.train --config configs/bit_transfer.py:sun,fast --workdir DIR \
      --config.data.data_dir=/path/to/tfds \
      --config.stages.student.teachers.teacher.source=/path/to/R152x2_T_sun128.npz

Budgets, as released with the paper (big_vision bigsweep_flowers_pet.py and bigsweep_food_sun.py,
"recommended settings from Fig3/Tab4"): epochs, peak lr, weight decay wd and KL temperature T.
wd is big_vision's: a decay of wd·lr(t)/lr per step, which an lr override leaves unchanged.

  DATASET  BUDGET     epochs    lr     wd     T
  flowers  fast       10,000   3e-3   3e-4   10
           medium    100,000   1e-3   1e-4    1
           long    1,000,000   3e-4   1e-5    1
  pets     fast        1,000   1e-2   1e-3    5
           medium      3,000   3e-3   3e-4   10
           long       30,000   3e-3   1e-5    2
  food     fast          100   1e-2   1e-3   10
           medium      1,000   1e-3   3e-4   10
           long        3,000   1e-2   1e-4    5
  sun      fast          100   1e-2   1e-3   10
           medium      1,000   1e-3   1e-4   10
           long        3,000   1e-2   3e-5   10

Data and teachers. Splits as released; the teacher is BiT-M-R152x2 (ImageNet-21k pre-trained)
fine-tuned on the dataset at 128 px, released as the file named here.

  DATASET  tfds name (classes)     train        val          test        teacher file
  flowers  oxford_flowers102 (102) train        validation   test        R152x2_T_flowers128.npz
  pets     oxford_iiit_pet (37)    train[:90%]  train[90%:]  test        R152x2_T_pet128.npz
  food     food101 (101)           train[:90%]  train[90%:]  validation  R152x2_T_food128.npz
  sun      sun397 (397)            train        validation   test        R152x2_T_sun128.npz

Food101 has no test split, so its validation split is the test set. SUN397 is tfds's default
config. Flowers (1,020 train images) and Pets are held on the devices; Food and SUN are streamed
(each process reads and decodes its rows of every batch: a tfds data_dir prepared as ArrayRecord,
or `python -m bigkd.prepare --tfds NAME ...` once, then `--config.data.source=records`).

Recipe (all four): student and teacher see the same 128 px inception crop (+ flip, mixup with one
Beta(1, 1) weight per batch); batch 512, Adam (bfloat16 first moment), 1500 warmup steps then
cosine, clip 1.0, KL at temperature T. The crop is the released inception crop (tf.image.
sample_distorted_bounding_box semantics, area 5-100%) over the whole image, each image resized
so that its long side is 192 px; evaluation is the released resize_small(160), central_crop(128).
"""
from bigkd import bit_recipes


def get_config(variant=None):
  return bit_recipes.transfer_config(variant)
