"""bigkd: knowledge distillation of image classifiers in JAX/Flax.

Where things live:
  train.py        command line: python -m bigkd.train --config configs/x.py --workdir DIR
  config.py       validation of a resolved config; one-line errors (exit code 2)
  data/           sources (digits, tfds, image folder), batch sampling, augment.py (crop boxes, views)
  models/         registry name -> linen module (CNN, CIFAR ResNets, BiT)
  losses.py       KL at temperature, Hinton, pseudo-labels, logit L2, ensembles
  optim/          optax chain from config (clip, adam/sgd/shampoo, weight decay, schedule)
  step.py         the jitted train step (teacher + student on the same views)
  evaluate.py     accuracy, agreement, KL on val/test
  checkpoint.py   orbax checkpoints of the student; teacher loading
  stages.py       the multi-stage runner (teacher -> assistants -> student)
"""
