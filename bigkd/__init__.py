"""bigkd: knowledge distillation of image classifiers in JAX/Flax.

Modules follow the data flow, config -> plan -> build -> loop:
  train.py        command line: bigkd-train (python -m bigkd.train) --config configs/x.py --workdir DIR
  config.py       every config field with its default and meaning
  plan.py         config -> stage plans; every check that needs no device (exit code 2)
  build.py        stage plan -> data, params, optimiser state, teachers, jitted step, inputs, eval
  stages.py       the loop: steps, logging, evaluation, checkpoints, resume
  step.py         the pure train step (teacher + student on the same views) and eval step
  data/           sources (digits, folder, records, tfds), prepare.py (-> ArrayRecord: records.py
                  its format, folders.py the image-folder rule), batch sampling, augment.py and
                  inception_crop.py (crop boxes, views)
  models/         registry name -> linen module (CNN, CIFAR ResNets, BiT and its .npz format)
  losses.py       KL at temperature, Hinton, pseudo-labels, logit L2, ensembles; feature and
                  relation losses (FitNet, AT, SP, PKT, RKD), DKD, DIST, CKA
  optim/          optax chain from config (clip, adam/sgd/shampoo/muon, weight decay, schedule)
  sharding.py     mesh, parameter sharding rule, multi-host placement
  checkpoint.py   orbax checkpoints of a stage; teachers and initialisations from folders / .npz
  evaluate.py     accuracy, agreement, KL on val/test
  inspect.py      the notebook API: load_run, a stage's model at any step, views of a step
  plots.py        matplotlib figures of a run;  report.py: WORKDIR/report.html
  bench.py        step throughput and MFU;  cli.py: --help, --fields, one-line errors
The bundled configs (digits demo, your own image folder, the paper's BiT runs) are in configs/
beside this package (installed inside it, as bigkd.configs).
"""
