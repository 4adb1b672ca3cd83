"""Shared test set-up: JAX's persistent compilation cache and the tiny experiment.

The cache directory is exported through the environment too, so the subprocesses the
end-to-end tests start (CLI runs, the 8-device run, kill-and-resume) reuse compilations.
Configs come from the experiment files themselves, at `size=tiny`, so a test trains what
a user would, only smaller.
"""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
_CACHE = ROOT / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
# Every compilation is stored: the two xdist workers and the CLI subprocesses the
# end-to-end tests start compile the same small functions again and again otherwise.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("MEDJAX_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])
# XLA:CPU's LLVM backend at -O0: the tests' tiny models spend far more time compiling than
# running, and -O0 compiles them about 3× faster (the semantics are the same; the cache
# keys include the flag, so a cache filled at another level is not mixed in).
# XLA:CPU's newer MLIR fusion emitters are off too: the older elemental emitter compiles
# the same train steps about a third faster (measured on the tiny flow and CycleGAN steps).
# Every test compares two runs made under the same flags, never against stored numbers.
TEST_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for _flag in TEST_FLAGS:
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# What the subprocesses that set XLA_FLAGS themselves put in it.
XLA_TEST_FLAGS = " ".join(TEST_FLAGS)
# The commands give a CPU run one device per core (medjax/host.py). The tests call them in
# this process too, where whichever ran first would fix every later test's device count:
# one device here and in the subprocesses, unless a test asks for more (test_host.py
# checks the commands' own rule in a clean environment).
os.environ.setdefault("MEDJAX_CPU_DEVICES", "1")
# The commands' malloc setting (medjax/host.py) from the start, before jax starts its
# threads: the in-process command calls would otherwise apply it midway, to some threads.
from medjax import host  # noqa: E402

host.tune_malloc()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

PHANTOM = ROOT / "experiments" / "phantom.py"


def tiny_spec(method: str = "flow", target: str = "t2w") -> str:
  return f"{PHANTOM}:method={method},target={target},size=tiny"


def tiny_config(method: str = "flow", target: str = "t2w"):
  """experiments/phantom.py at size=tiny: 32×32×12 slices, an 8-channel U-Net, 6 steps."""
  from medjax import config as config_lib
  return config_lib.load(tiny_spec(method, target))


@pytest.fixture
def make_config():
  return tiny_config


@pytest.fixture(scope="session")
def ct_run(tmp_path_factory):
  """A tiny trained T1w → CT run (regression), shared by the DICOM and input-check tests."""
  from medjax import train
  workdir = tmp_path_factory.mktemp("ct_run")
  train.train_and_evaluate(tiny_config("regression", "ct"), str(workdir))
  return workdir


@pytest.fixture(scope="session")
def tiny_flow_run(tmp_path_factory):
  """A tiny trained T1w → T2w flow run, read (never changed) by the translate and export
  tests."""
  from medjax import train
  workdir = tmp_path_factory.mktemp("flow_run")
  train.train_and_evaluate(tiny_config("flow"), str(workdir))
  return workdir


# The two-stage runs' 6 tiny steps: checkpoints at 3 and 6, so test_families.py resumes a
# copy from 3 and compares with 6 instead of training the family again.
TWO_STAGE_SAVES = {"checkpoint.every": 3}


def _trained(tmp_path_factory, name: str, spec: str, evaluate: bool = True):
  """Train `spec` at the tiny size into a fresh folder: (workdir, summary). Without
  `evaluate` the loop's evaluation is stubbed (no test reads it; the summary is None)."""
  from medjax import config as config_lib
  from medjax import train
  workdir = tmp_path_factory.mktemp(name)
  config = config_lib.load(f"{ROOT}/experiments/{spec}", TWO_STAGE_SAVES)
  with pytest.MonkeyPatch.context() as patch:
    if not evaluate:
      patch.setattr(train.evaluate_lib, "evaluate_run", lambda run, split, **kwargs: {})
      patch.setattr(train.evaluate_lib, "format_summary", lambda summary: "")
    summary = train.train_and_evaluate(config, str(workdir))
  return workdir, (summary if evaluate else None)


# The tiny tokenizer trains with its optional PatchGAN term, so the families' checks below
# cover the autoencoders' adversarial state too.
VQ_ARG = "kind=vq,adversarial=0.1,"


def _first_stage_run(tmp_path_factory, name: str, arg: str, evaluate: bool = True):
  return _trained(tmp_path_factory, name, f"phantom_vae.py:{arg}size=tiny", evaluate)


@pytest.fixture(scope="session")
def tiny_vae_run(tmp_path_factory):
  """A tiny trained T2w `vae` run (workdir, summary): the first stage of the latent
  translators' tests (read, never changed)."""
  return _first_stage_run(tmp_path_factory, "vae_run", "")


@pytest.fixture(scope="session")
def tiny_vq_run(tmp_path_factory):
  """A tiny trained T2w `vqvae` run (workdir, None): the autoregressive translator's
  tokenizer in the tests (read, never changed). Its own evaluation is stubbed: no test
  reads it (test_autoencoder.py checks the VQ's metrics on its own steps)."""
  return _first_stage_run(tmp_path_factory, "vq_run", VQ_ARG, evaluate=False)


# What a user trains on the first stages above (both read, never changed): the specs are
# kept here so test_families.py resumes exactly these runs.
LATENT_SPEC = "phantom_latent.py:size=tiny,vae={}"
AR_SPEC = "phantom_ar.py:size=tiny,tokenizer={}"


def family_specs(vae_run, vq_run) -> dict[str, str]:
  """The families with state or sharding of their own (docs/design.md, "Tests"): name →
  the experiment a user trains it from at the tiny size, first stages filled in. Checked
  on 8 devices in test_mesh.py, and all but mamba (no state of its own) for resume in
  test_families.py, whose runs are the session fixtures above: the same specs."""
  return {"mamba": f"{ROOT}/experiments/phantom.py:method=regression,model=mamba,size=tiny",
          "vae": f"{ROOT}/experiments/phantom_vae.py:size=tiny",
          "vqvae": f"{ROOT}/experiments/phantom_vae.py:{VQ_ARG}size=tiny",
          "latent": f"{ROOT}/experiments/{LATENT_SPEC.format(vae_run)}",
          "autoregressive": f"{ROOT}/experiments/{AR_SPEC.format(vq_run)}"}


@pytest.fixture(scope="session")
def tiny_latent_run(tiny_vae_run, tmp_path_factory):
  """A tiny latent flow run on `tiny_vae_run` (workdir, summary)."""
  return _trained(tmp_path_factory, "latent_run", LATENT_SPEC.format(tiny_vae_run[0]))


@pytest.fixture(scope="session")
def tiny_ar_run(tiny_vq_run, tmp_path_factory):
  """A tiny autoregressive run on `tiny_vq_run` (workdir, summary)."""
  return _trained(tmp_path_factory, "ar_run", AR_SPEC.format(tiny_vq_run[0]))
