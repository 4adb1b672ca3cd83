"""Sweeps: one experiment config over a grid of overrides (`medjax sweep`).

`grid` is the language a sweep file uses (`sweep`, `product`, `zipped`), `devices` finds
the accelerators each point is pinned to, `runner` runs and gathers the points, `slurm`
writes a job array instead.
"""

from medjax.sweep.grid import SweepError, product, sweep, zipped

__all__ = ["SweepError", "product", "sweep", "zipped"]
