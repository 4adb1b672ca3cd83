"""Several trained runs translating as one (`medjax translate --workdir RUN1 RUN2 …`).

An `Ensemble` stands where `medjax translate` takes a `Run`: members must share the
preprocessing recipe, the sources and the target, so one preprocessed input serves all
and one output geometry and unit fit all. Each member predicts with its own settings;
the predictions combine by the mixture law (`sliding.combine`), so the std holds the
members' disagreement beside each member's draws (docs/design.md, "Sliding windows, TTA
and ensembles"). What the sidecar shows as "the model" is the first member; it lists
every member.
"""

from __future__ import annotations

import dataclasses

from medjax.errors import UserError


def members(run) -> list:
  """The runs behind `run`: an Ensemble's members, or the run itself."""
  return list(getattr(run, "members", [run]))


def check_compatible(runs) -> None:
  """A one-line UserError naming two runs and what differs, if any pair cannot ensemble."""
  first = runs[0]
  for other in runs[1:]:
    differences = []
    if first.target != other.target:
      differences.append(f"target ({first.target} vs {other.target})")
    if tuple(first.recipe.sources) != tuple(other.recipe.sources):
      differences.append(f"sources ({'+'.join(first.recipe.sources)} vs "
                         f"{'+'.join(other.recipe.sources)})")
    a, b = first.recipe.to_dict(), other.recipe.to_dict()
    keys = sorted(k for k in a.keys() | b.keys() if k != "sources" and a.get(k) != b.get(k))
    if keys:
      differences.append(f"preprocessing recipe ({', '.join(keys)})")
    if differences:
      raise UserError(f"{first.workdir} and {other.workdir} cannot form an ensemble: their "
                      + "; ".join(differences) + " differ")


@dataclasses.dataclass
class Ensemble:
  """Runs of one recipe, sources and target; the first stands for all where one is read
  (recipe, target, baseline, input ranges, config defaults)."""
  members: list

  def __post_init__(self):
    if not self.members:
      raise UserError("an ensemble needs at least one run")
    check_compatible(self.members)

  @classmethod
  def load(cls, workdirs, *, step: int | None = None) -> Ensemble:
    from medjax.run import Run
    return cls([Run.load(workdir, step=step) for workdir in workdirs])

  def __getattr__(self, name):
    # Only reached for what the dataclass lacks: config, recipe, target, inputs,
    # translator, step, workdir, … of the first member.
    if name == "members":
      raise AttributeError(name)
    return getattr(self.members[0], name)
