"""Oxford-IIIT Pets (tfds `oxford_iiit_pet`): BiT-M-R152x2 distilled into BiT-R50x1 by function
matching (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent").

  python -m bigkd.train --config configs/bit_pets.py:medium --workdir DIR \
      --config.data.data_dir=/path/to/tfds \
      --config.stages.student.teachers.teacher.source=/path/to/R152x2_T_pet128.npz

Variants (`BUDGET[,epochs=N][,init[=PATH.npz]]`, see bigkd/bit_recipes.py); the budgets are the
released recommended settings (the paper's Fig. 3 / Tab. 4; weight decay in big_vision's
convention, converted for bigkd's Adam in bigkd/bit_recipes.py):
  fast    1,000 epochs, lr 1e-2, weight decay 1e-3, temperature 5 (the default)
  medium  3,000 epochs, lr 3e-3, weight decay 3e-4, temperature 10
  long    30,000 epochs, lr 3e-3, weight decay 1e-5, temperature 2
  epochs=N     replaces the budget's training length (keeping its lr, weight decay, temperature).
  init[=PATH]  starts the student from a pretrained BiT-R50x1 .npz (e.g. BiT-M-R50x1.npz)
               instead of random weights: the paper's transfer-initialised student.

Teacher: BiT-M-R152x2 (ImageNet-21k pre-trained) fine-tuned on this dataset at 128 px, released
as R152x2_T_pet128.npz. Student and teacher see the same 128 px inception crop (+ flip, mixup);
batch 512, Adam, 1500 warmup steps then cosine, clip 1.0. Images are stored at 160 px.
Splits as released: train = train[:90%], val = train[90%:], test = test; held on the devices.
"""
from bigkd import bit_recipes as common_bit


def get_config(variant=None):
  return common_bit.small_dataset_config('pets', variant)
