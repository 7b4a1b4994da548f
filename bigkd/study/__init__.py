"""The paper's claims in miniature: one command that runs its four experiments on the digits.

  python -m bigkd.study WORKDIR [--seeds N] [--only modes,patience,resolution,optimizer]
                                [--config default|fast]

Runs, for each seed, from teachers trained once per seed (configs/study.py says what and why):
the four teaching modes at one budget; function matching and the fixed teacher at budgets
spaced x3 (patience); students of teachers at 12, 16 and 24 px (resolution); Adam and Shampoo at
several budgets, each with its own schedule and its best learning rate, and the Adam budget that
matches each Shampoo budget's final val KL (optimizer). Writes WORKDIR/study.json (every number,
per seed), WORKDIR/study.md (the tables) and WORKDIR/*.png (the figures).

Every run is one stage in its own workdir, WORKDIR/seed_S/RUN (`bigkd.stages.run`): a run that
finished is read back, not trained again, and an interrupted one resumes from its checkpoint,
so re-running the command (with more seeds, or other parts) only computes what is missing. The
report is always made from everything finished on disk, whichever parts this call ran.

Modules: runs.py (each part's runs, their configs, training and reading them back), analysis.py
(the numbers per part and the paper's claims), figures.py, report.py (study.md, study.json and
the PNGs), command.py (the command line; `python -m bigkd.study` runs it). The config:
configs/study.py.
"""
import os

# Shampoo's inverse roots call LAPACK; a multi-threaded OpenBLAS on a small, busy CPU spins its
# threads against each other (benchmarks/README.md). Read when jax loads LAPACK, after this.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
