"""medjax: medical image-to-image translation in JAX (docs/design.md).

`import medjax` stays cheap: nothing heavy (JAX, orbax) is imported until it is used.
"""


def load_model(path, **kwargs):
  """An exported model folder (`medjax export`) as a `medjax.run.Run`, ready for
  `infer.translate_file`; keyword arguments go to `Run.load_model` (e.g. `mesh`)."""
  from medjax.run import Run
  return Run.load_model(path, **kwargs)
