"""Where a run reports to: metrics.jsonl, TensorBoard events, the terminal.

Only process 0 writes; the others get a writer that drops everything, so the trainer
never branches on the process index.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

  def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": prefix, "time": time.time(),
                                  **scalars}) + "\n")
    for key, value in scalars.items():
      self._tb.add_scalar(f"{prefix}/{key}", value, step)

  def image(self, step: int, tag: str, path: str) -> None:
    if self.enabled:
      import matplotlib.image
      self._tb.add_image(tag, matplotlib.image.imread(path)[..., :3], step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
