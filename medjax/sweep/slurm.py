"""`medjax sweep --emit slurm`: a SLURM job array, one task per point."""

from __future__ import annotations

import os
import shlex
import sys


def script(config_spec: str, root: str, jobs: list[dict], *, parallel: int | None,
                 devices_per_run: int, kind: str) -> str:
  """A job array, one task per point; each task is a plain one-process `medjax train`."""
  root = os.path.abspath(root)
  limit = f"%{parallel}" if parallel else ""
  lines = [
      "#!/bin/bash",
      f"# medjax sweep: {len(jobs)} points of {config_spec}. Submit: sbatch {root}/sweep.slurm",
      "# Re-submitting is safe: finished points exit at once, others resume from their checkpoint.",
      "#SBATCH --job-name=medjax-sweep",
      f"#SBATCH --array=0-{len(jobs) - 1}{limit}",
      "#SBATCH --ntasks=1",
      f"#SBATCH --cpus-per-task={max(4, 4 * devices_per_run)}",
      f"#SBATCH --output={root}/logs/%x-%A_%a.log",
  ]
  if kind != "cpu":
    lines.append(f"#SBATCH --gres=gpu:{devices_per_run}")
  lines += ["", "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", "POINTS=("]
  lines += [f"  {shlex.quote(shlex.join(job['command'][1:]))}" for job in jobs]
  lines += [")", f"PYTHON=${{PYTHON:-{shlex.quote(sys.executable)}}}",
            'eval "$PYTHON ${POINTS[$SLURM_ARRAY_TASK_ID]}"', ""]
  return "\n".join(lines)
