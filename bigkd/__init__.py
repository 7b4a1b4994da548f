"""bigkd: knowledge distillation of image classifiers in JAX/Flax.

Modules, listed so that each imports only modules above it (tests/test_layers.py checks it):
the formulas, models and optimisers; then the data flow, config -> plan -> build -> loop; then
what reads a run's outputs (training never imports those).
  tf_quiet.py     TensorFlow imported once, quietly, by the modules that read data or write events
  paths.py        local or bucket (gs://) paths, one type (etils.epath): files written whole, moves
  losses.py       the formulas: KL at temperature, Hinton, ensembles; FitNet, AT, SP, PKT, RKD,
                  DKD, DIST, CKA
  models/         registry name -> linen module (CNN, CIFAR ResNets, BiT, ViT; their .npz formats),
                  feature taps, FitNet adapters
  optim/          optax chain from config (clip, adam/sgd/shampoo/muon, weight decay, schedule)
  config.py       every config field with its default and meaning; ConfigError
  cli.py          --help, --fields, one-line errors, where the bundled configs are
  bit_recipes.py  BiT-HyperRule lengths and canvas sizes for configs
  data/           errors, records.py (the prepared format), folders.py (the image-folder rule),
                  sources (digits, folder, records, tfds; a stage's train_data), prepare
                  (-> ArrayRecord), batch sampling (mixtures too), augment.py and
                  inception_crop.py (crop boxes, views)
  evaluate.py     accuracy, agreement, KL, CKA on val/test from an eval step's sums
  sharding.py     mesh (and its shape), parameter sharding rule, multi-host placement
  checkpoint.py   orbax checkpoints of a stage; teachers and initialisations from folders / .npz
  teacher_cache.py  fixed_teacher stages: the teachers' logits computed once, read per step
  plan.py         config -> stage plans; every check that needs no device (exit code 2)
  workdir.py      the workdir guard: config changes, started stages; run-level records
  forward.py      one forward: a model on a view -> float32 logits + requested feature taps
  objective.py    a stage's loss: weighted terms over the forward outputs, summed once
  step.py         the pure train step (teacher + student on the same views) and eval step
  views.py        what teacher and student see under each teaching mode (a grid image)
  build.py        stage plan -> data, params, optimiser state, teachers, jitted step, inputs, eval
  stages.py       the loop: steps, logging, evaluation, checkpoints, resume
  train.py        command line: bigkd-train (python -m bigkd.train) --config configs/x.py --workdir DIR
  bench.py        step throughput and MFU (bigkd-bench)
  launch_plan.py  bigkd-plan: the train step compiled for a TPU slice; memory, FLOPs, run length
  inspect.py      the notebook API: load_run, a stage's model at any step, views of a step
  plots.py        matplotlib figures of a run
  report.py       WORKDIR/report.html (bigkd-report)
  prepare.py      python -m bigkd.prepare (data/prepare.py)
  study/          the paper's findings in miniature on the digits (python -m bigkd.study)
The bundled configs (digits demo, your own image folder, the paper's BiT runs, a ViT pair) are in
configs/ beside this package (installed inside it, as bigkd.configs).
"""
