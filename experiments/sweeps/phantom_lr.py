r"""Learning rate × seed for the default phantom experiment (T1w → T2w, flow matching).

  medjax sweep --config experiments/phantom.py --sweep experiments/sweeps/phantom_lr.py \
      --workdir runs/phantom_lr --parallel 2

Three learning rates a factor √10 apart around the default 1e-3, each with two seeds, so
the table shows whether a difference between learning rates is larger than seed noise.
"""

from medjax.sweep import product, sweep


def get_sweep():
  return product(sweep("train.learning_rate", [3e-4, 1e-3, 3e-3]),
                 sweep("seed", [0, 1]))
