"""`medjax export` and `translate --model`: a model folder that stands in for its run."""

import json
import shutil
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

import medjax
from medjax import cli, infer
from medjax.data import phantom
from medjax.run import Run


@pytest.fixture(scope="module")
def run(tiny_flow_run):
  return tiny_flow_run


@pytest.fixture(scope="module")
def model(run, tmp_path_factory):
  out = tmp_path_factory.mktemp("models") / "flow"
  assert cli.main(["medjax", "export", "--workdir", str(run), "--out", str(out)]) == 0
  return out


@pytest.fixture(scope="module")
def t1w(tmp_path_factory):
  """A phantom T1w off the model's grid (2.5 × 3 × 4 mm)."""
  data = phantom.generate(0, 4, shape=(64, 52, 24), spacing=(2.5, 3.0, 4.0))["t1w"]
  path = tmp_path_factory.mktemp("input") / "t1w.nii.gz"
  nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([2.5, 3.0, 4.0, 1.0])), path)
  return path


def voxels(path):
  return np.asarray(nib.load(path).dataobj)


def medjax_cli(*argv):
  return cli.main(["medjax", *map(str, argv)])


def test_translate_with_the_model_is_bit_identical_without_the_run(run, t1w, tmp_path):
  """Two flow draws with the run's seed: the same voxels from the run and from a model
  exported from a copy of it, with that copy deleted first."""
  copy = shutil.copytree(run, tmp_path / "copy")
  model = tmp_path / "model"
  assert medjax_cli("export", "--workdir", copy, "--out", model) == 0
  shutil.rmtree(copy)
  by_run, by_model = tmp_path / "run.nii.gz", tmp_path / "model.nii.gz"
  assert medjax_cli("translate", "--workdir", run, "--input", t1w, "--output", by_run) == 0
  assert medjax_cli("translate", "--model", model, "--input", t1w, "--output", by_model) == 0
  assert np.array_equal(voxels(by_model), voxels(by_run))
  assert voxels(by_run).std() > 0


def test_load_model_is_run_load(run, model, t1w, tmp_path):
  """The Python entry point: same parameters, same shardings, same translation."""
  loaded, trained = medjax.load_model(model), Run.load(run)
  assert (loaded.step, loaded.recipe, loaded.target) == (trained.step, trained.recipe,
                                                          trained.target)
  assert np.array_equal(loaded.baseline.table, trained.baseline.table)
  same = jax.tree.map(lambda a, b: a.sharding == b.sharding and np.array_equal(a, b),
                      loaded.params, trained.params)
  assert all(jax.tree.leaves(same))
  outputs = []
  for name, source in (("model", loaded), ("run", trained)):
    outputs.append(tmp_path / f"{name}.nii.gz")
    infer.translate_file(source, [t1w], outputs[-1], progress=False)
  assert np.array_equal(voxels(outputs[0]), voxels(outputs[1]))


def test_import_medjax_stays_cheap():
  code = "import sys, medjax; assert callable(medjax.load_model); print('jax' in sys.modules)"
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=ROOT, check=True)
  assert done.stdout.strip() == "False"


def test_the_folder_is_lean_and_complete(run, model):
  """Only what translation needs: no checkpoints, optimiser state or data iterator. The
  tiny model's EMA parameters are ~176 kB of float32; orbax's own metadata (tree, sharding
  and array metadata, ~70 kB) and the JSON files make its folder about 1.6× that (a
  full-size model's metadata is the same few tens of kB, so the ratio tends to 1). Asserted:
  params/ < 2× the parameters, and the whole folder < 2× the parameters + 64 KiB."""
  trained = Run.load(run)
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(trained.params))
  size = lambda folder: sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
  assert size(model / "params") < 2 * param_bytes
  assert size(model) < 2 * param_bytes + 64 * 1024
  names = {p.name for p in model.iterdir()}
  assert names == {"config.json", "preprocessing.json", "baseline.json", "inputs.json",
                   "params", "model.json", "MODEL_CARD.md"}
  assert not list(model.rglob("opt_state*")) and not list(model.rglob("iter"))
  assert medjax.load_model(model).inputs == trained.inputs and trained.inputs["subjects"] == 3
  marker = json.loads((model / "model.json").read_text())
  assert marker["format"] == "medjax-model" and marker["version"] == 1
  assert (marker["step"], marker["source"], marker["target"]) == (6, ["t1w"], "t2w")
  assert marker["medjax"] == medjax_version() and marker["inputs"] == "inputs.json"
  for name in ("config.json", "preprocessing.json", "baseline.json", "inputs.json"):
    assert (model / name).read_bytes() == (run / name).read_bytes()
  card = (model / "MODEL_CARD.md").read_text()
  summary = json.loads((run / "eval" / "6" / "summary.json").read_text())
  for text in ("t1w → t2w", "Not for clinical use", "research only", "step 6",
               "Training subjects: 3", "2 step(s) × 2 draw(s)", "`inputs.json`",
               f"{summary['model']['psnr']:.4g}", f"{summary['baseline']['psnr']:.4g}"):
    assert text in card


def medjax_version():
  import importlib.metadata
  return importlib.metadata.version("medjax")


def test_export_of_an_earlier_checkpoint_with_input_statistics(run, tmp_path):
  copy = shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("eval"))
  (copy / "inputs.json").write_text('{"t1w": {"spacing": [5, 5, 8]}}\n')
  model = tmp_path / "model"
  assert medjax_cli("export", "--workdir", copy, "--out", model, "--checkpoint", 3) == 0
  marker = json.loads((model / "model.json").read_text())
  assert marker["step"] == 3 and marker["inputs"] == "inputs.json"
  assert (model / "inputs.json").read_bytes() == (copy / "inputs.json").read_bytes()
  assert "No evaluation of step 3" in (model / "MODEL_CARD.md").read_text()
  loaded, trained = medjax.load_model(model), Run.load(run, step=3)
  assert loaded.step == 3
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded.params, trained.params)))


def one_line_error(capsys, code, *names):
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert "\n" not in err and err.startswith("medjax "), err
  for name in names:
    assert str(name) in err, err
  return err


def test_export_refuses_a_used_out_folder(run, model, tmp_path, capsys):
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  code = medjax_cli("export", "--workdir", run, "--out", other)
  one_line_error(capsys, code, other, "--force")
  code = medjax_cli("export", "--workdir", run, "--out", other, "--force")
  one_line_error(capsys, code, other, "model.json")
  assert (other / "keep.txt").read_text() == "mine"
  code = medjax_cli("export", "--workdir", run, "--out", model)
  one_line_error(capsys, code, model)
  code = medjax_cli("export", "--workdir", run, "--out", run, "--force")
  one_line_error(capsys, code, run)
  code = medjax_cli("export", "--workdir", tmp_path / "nothing", "--out", tmp_path / "m")
  one_line_error(capsys, code, tmp_path / "nothing")
  assert not (tmp_path / "m").exists()
  # --force replaces an earlier export, and an empty folder is used as it is
  again = shutil.copytree(model, tmp_path / "again")
  (again / "stale.txt").write_text("old")
  assert medjax_cli("export", "--workdir", run, "--out", again, "--force") == 0
  assert not (again / "stale.txt").exists() and (again / "model.json").is_file()
  (tmp_path / "empty").mkdir()
  assert medjax_cli("export", "--workdir", run, "--out", tmp_path / "empty") == 0
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def damage(model, tmp_path, how):
  broken = shutil.copytree(model, tmp_path / "broken")
  if how == "no model.json":
    (broken / "model.json").unlink()
    return broken, broken / "model.json"
  if how == "truncated model.json":
    (broken / "model.json").write_text('{"format": "medjax-mo')
    return broken, broken / "model.json"
  if how == "another format":
    (broken / "model.json").write_text('{"format": "onnx", "version": 1, "step": 6}')
    return broken, broken / "model.json"
  if how == "no params":
    shutil.rmtree(broken / "params")
    return broken, broken / "params"
  if how == "no preprocessing.json":
    (broken / "preprocessing.json").unlink()
    return broken, broken / "preprocessing.json"
  # the largest array file cut in half
  largest = max((p for p in (broken / "params").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  return broken, broken / "params"


@pytest.mark.parametrize("how", ["no model.json", "truncated model.json", "another format",
                                 "no params", "no preprocessing.json", "truncated params"])
def test_a_damaged_model_is_one_line_naming_the_file(model, t1w, tmp_path, capsys, how):
  broken, named = damage(model, tmp_path, how)
  code = medjax_cli("translate", "--model", broken, "--input", t1w,
                    "--output", tmp_path / "out.nii.gz")
  one_line_error(capsys, code, named)
  assert not (tmp_path / "out.nii.gz").exists()


def test_model_must_be_a_model_folder(run, model, t1w, tmp_path, capsys):
  out = tmp_path / "out.nii.gz"
  for folder, named in ((run, run / "model.json"), (tmp_path, tmp_path / "model.json"),
                        (tmp_path / "absent", tmp_path / "absent")):
    code = medjax_cli("translate", "--model", folder, "--input", t1w, "--output", out)
    one_line_error(capsys, code, named)
  code = medjax_cli("translate", "--workdir", model, "--input", t1w, "--output", out)
  one_line_error(capsys, code, model, "--model")
  code = medjax_cli("translate", "--input", t1w, "--output", out)
  one_line_error(capsys, code, "--workdir", "--model")
  code = medjax_cli("translate", "--workdir", run, "--model", model, "--input", t1w,
                    "--output", out)
  one_line_error(capsys, code, "--workdir", "--model")
  code = medjax_cli("translate", "--model", model, "--checkpoint", "3", "--input", t1w,
                    "--output", out)
  one_line_error(capsys, code, "--checkpoint")
  assert not out.exists()


def test_a_failed_export_leaves_nothing(run, tmp_path, monkeypatch):
  """A crash while writing never leaves a half model under --out; what a killed export
  left beside it (its pid gone) is cleared by the next one."""
  from medjax import checkpoint, export
  out = tmp_path / "model"
  killed = tmp_path / f".tmp-999999999-{out.name}"
  (killed / "params").mkdir(parents=True)

  def full_disk(directory, *args, **kwargs):
    raise OSError(28, "No space left on device", str(directory))
  monkeypatch.setattr(checkpoint, "save_tree", full_disk)
  with pytest.raises(OSError) as raised:
    export.export(run, out)
  assert raised.value.filename == str(out)
  assert list(tmp_path.iterdir()) == []
