"""Food101 (tfds `food101`): BiT-M-R152x2 distilled into BiT-R50x1 by function matching
(Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent").

  python -m bigkd.train --config configs/bit_food.py:medium --workdir DIR \
      --config.data.data_dir=/path/to/tfds \
      --config.stages.student.teachers.teacher.source=/path/to/R152x2_T_food128.npz

Variants (`BUDGET[,epochs=N][,init[=PATH.npz]]`, see bigkd/bit_recipes.py); the budgets are the
released recommended settings (the paper's Fig. 3 / Tab. 4; weight decay in big_vision's
convention, converted for bigkd's Adam in bigkd/bit_recipes.py):
  fast    100 epochs, lr 1e-2, weight decay 1e-3, temperature 10 (the default)
  medium  1,000 epochs, lr 1e-3, weight decay 3e-4, temperature 10
  long    3,000 epochs, lr 1e-2, weight decay 1e-4, temperature 5
  epochs=N     replaces the budget's training length (keeping its lr, weight decay, temperature).
  init[=PATH]  starts the student from a pretrained BiT-R50x1 .npz (e.g. BiT-M-R50x1.npz)
               instead of random weights: the paper's transfer-initialised student.

Teacher: BiT-M-R152x2 (ImageNet-21k pre-trained) fine-tuned on this dataset at 128 px, released
as R152x2_T_food128.npz. Student and teacher see the same 128 px inception crop (+ flip, mixup);
batch 512, Adam, 1500 warmup steps then cosine, clip 1.0. Images are stored at 160 px.
Splits as released: train = train[:90%], val = train[90%:], test = validation (Food101 has no
test split); streamed from host memory (about 5.8 GB at 160 px).
"""
from bigkd import bit_recipes as common_bit


def get_config(variant=None):
  return common_bit.small_dataset_config('food', variant)
