"""`medjax translate`: geometry in = geometry out, for oblique and non-RAS files."""

import json
import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import nibabel.orientations as nio
import numpy as np
import pytest

from conftest import tiny_config
from medjax import baseline, cli, evaluate, infer, parallel, sliding
from medjax.data import phantom, preprocess
from medjax.run import Run

SPACING = (5.0, 5.0, 8.0)  # tiny_config's phantom grid: 32 × 32 × 12 voxels


def rotation(degrees_x, degrees_y):
  a, b = np.deg2rad(degrees_x), np.deg2rad(degrees_y)
  rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  return rx @ ry


def write(path, data_ras, spacing, *, axcodes="RAS", degrees=(0, 0), qform_code=1,
          sform_code=1):
  """A RAS-ordered volume saved in `axcodes` voxel order under an oblique affine."""
  affine = np.diag([*spacing, 1.0])
  affine[:3, :3] = rotation(*degrees) @ affine[:3, :3]
  affine[:3, 3] = -affine[:3, :3] @ (np.array(data_ras.shape) - 1) / 2  # centred
  transform = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(axcodes))
  data = nio.apply_orientation(data_ras, transform)
  affine = affine @ nio.inv_ornt_aff(transform, data_ras.shape)
  image = nib.Nifti1Image(np.asarray(data, np.float32), affine)
  image.set_qform(affine, code=qform_code)
  image.set_sform(affine, code=sform_code)
  nib.save(image, path)
  return path


def assert_same_geometry(reference, output):
  a, b = nib.load(reference), nib.load(output)
  assert b.shape == a.shape
  np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
  np.testing.assert_allclose(b.header.get_qform(), a.header.get_qform(), atol=1e-5)
  np.testing.assert_allclose(b.header.get_sform(), a.header.get_sform(), atol=1e-5)
  assert int(b.header["qform_code"]) == int(a.header["qform_code"])
  assert int(b.header["sform_code"]) == int(a.header["sform_code"])
  np.testing.assert_allclose(b.header.get_zooms(), a.header.get_zooms(), rtol=1e-6)
  assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine)
  assert b.get_data_dtype() == np.float32


@pytest.fixture(scope="module")
def run(tiny_flow_run):
  return tiny_flow_run


@pytest.fixture(scope="module")
def t1w():
  """A phantom T1w at 2.5 × 3 × 4 mm (not the model's grid), RAS voxel order."""
  return phantom.generate(0, 4, shape=(64, 52, 24), spacing=(2.5, 3.0, 4.0))["t1w"]


@pytest.mark.parametrize("axcodes,degrees", [("LAS", (20, 20)), ("LPS", (0, 0)),
                                             ("PIL", (-15, 25))])
def test_output_has_the_inputs_geometry(run, t1w, tmp_path, axcodes, degrees, capsys):
  source = write(tmp_path / "t1w.nii.gz", t1w, (2.5, 3.0, 4.0), axcodes=axcodes,
                 degrees=degrees, qform_code=1, sform_code=2)
  out, std = tmp_path / "sub" / "t2w.nii.gz", tmp_path / "std.nii.gz"
  assert cli.main(["medjax", "translate", "--workdir", str(run), "--input", str(source),
                   "--output", str(out), "--samples", "2", "--uncertainty", str(std)]) == 0
  assert_same_geometry(source, out)
  assert_same_geometry(source, std)
  prediction = nib.load(out).get_fdata()
  assert np.isfinite(prediction).all() and 0.0 <= prediction.min() and prediction.max() <= 1.0
  assert nib.load(std).get_fdata().max() > 0  # two flow draws differ
  assert "slices in" in capsys.readouterr().out  # the time per volume


def test_orientation_does_not_change_the_translation(run, t1w, tmp_path):
  """The same voxels stored RAS and LPS are the same image: the same prediction."""
  outputs = {}
  for axcodes in ("RAS", "LPS"):
    source = write(tmp_path / f"{axcodes}.nii.gz", t1w, (2.5, 3.0, 4.0), axcodes=axcodes)
    outputs[axcodes] = tmp_path / f"{axcodes}_out.nii.gz"
    assert cli.main(["medjax", "translate", "--workdir", str(run), "--input", str(source),
                     "--output", str(outputs[axcodes])]) == 0
  ras, lps = (nib.as_closest_canonical(nib.load(outputs[a])).get_fdata() for a in ("RAS", "LPS"))
  np.testing.assert_allclose(lps, ras, atol=1e-5)


class Identity:
  """A translator that returns its source: what comes out is preprocessing, inverted."""
  name, stochastic = "identity", False

  def translate(self, params, source, rng, *, steps=None, samples=1):
    return source[..., :1], jnp.zeros_like(source[..., :1])


def identity_model(config):
  recipe = preprocess.Recipe.of_phantom(config)
  table = baseline.IntensityMap(np.linspace(-1, 1, 4).astype(np.float32))
  return Run(None, config, recipe, table, Identity(), {}, 0, parallel.make_mesh())


def test_preprocessing_is_inverted_exactly_on_the_models_grid(tmp_path):
  """Oblique LPS file already at the model's voxel size: no interpolation anywhere, so the
  output is the input mapped linearly to [0, 1], voxel for voxel."""
  config = tiny_config("flow")
  data = phantom.generate(1, 2, shape=(32, 32, 12), spacing=SPACING)["t1w"]
  source = write(tmp_path / "t1w.nii.gz", data, SPACING, axcodes="LPS", degrees=(20, 20))
  out = tmp_path / "out.nii.gz"
  infer.translate_file(identity_model(config), [source], out, progress=False)
  assert_same_geometry(source, out)
  x = np.asarray(nib.load(source).dataobj, np.float64)
  y = nib.load(out).get_fdata()
  inside = (y > 1e-3) & (y < 1 - 1e-3)  # not clipped by the robust range
  assert inside.mean() > 0.2
  slope, offset = np.polyfit(x[inside], y[inside], 1)
  assert slope > 0
  np.testing.assert_allclose(y[inside], slope * x[inside] + offset, atol=1e-5)


def test_preprocessing_is_inverted_through_resampling(tmp_path):
  """A finer, oblique, LAS file goes to 5 mm and back: the image stays where it was."""
  config = tiny_config("flow")
  # Smooth on the 5 mm scale (an off-centre blob and a ramp), so that going down to 5 mm
  # and back loses little; any misplacement would.
  x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in (64, 52, 24)), indexing="ij")
  blob = np.exp(-((x - 26) / 14) ** 2 - ((y - 30) / 10) ** 2 - ((z - 10) / 5) ** 2)
  smooth = 1000 * blob * (1 + 0.5 * x / 64)
  source = write(tmp_path / "t1w.nii.gz", smooth, (2.5, 3.0, 4.0), axcodes="LAS",
                 degrees=(20, -20))
  out = tmp_path / "out.nii.gz"
  infer.translate_file(identity_model(config), [source], out, progress=False)
  assert_same_geometry(source, out)
  x = np.asarray(nib.load(source).dataobj, np.float64)
  y = nib.load(out).get_fdata()
  inside = (y > 0.02) & (y < 0.98)  # not clipped by the robust range
  assert inside.sum() > 1000
  assert np.corrcoef(x[inside], y[inside])[0, 1] > 0.995
  # Shifting the output by one voxel along any axis matches worse: nothing is displaced.
  aligned = np.corrcoef(x.ravel(), y.ravel())[0, 1]
  for axis in range(3):
    assert np.corrcoef(x.ravel(), np.roll(y, 2, axis).ravel())[0, 1] < aligned


def test_2p5d_context_channels_are_modality_major():
  source = np.arange(4)[:, None, None, None] + 10 * np.arange(2)[None, None, None, :]
  source = np.broadcast_to(source, (4, 3, 3, 2)).astype(np.float32)
  stacked = preprocess.with_context(source, 1)
  np.testing.assert_array_equal(stacked[0, 0, 0], [0, 0, 1, 10, 10, 11])
  np.testing.assert_array_equal(stacked[3, 0, 0], [2, 3, 3, 12, 13, 13])


def test_directory_mode_reports_a_bad_subject_and_does_the_rest(run, tmp_path, capsys):
  data = phantom.generate(0, 1, shape=(32, 32, 12), spacing=SPACING)
  root = tmp_path / "data"
  for name in ("good", "broken"):
    (root / name).mkdir(parents=True)
    write(root / name / "t1w.nii.gz", data["t1w"], SPACING, axcodes="LPS")
  (root / "broken" / "t1w.nii.gz").write_bytes(b"\x1f\x8b not a volume")
  out = tmp_path / "out"
  assert cli.main(["medjax", "translate", "--workdir", str(run), "--input-dir", str(root),
                   "--layout", "phantom", "--output-dir", str(out), "--samples", "2"]) == 1
  err = capsys.readouterr().err
  assert "broken" in err and "t1w.nii.gz" in err
  assert err.strip().splitlines()[-1].startswith("medjax translate: error: 1 of 2 subjects")
  assert_same_geometry(root / "good" / "t1w.nii.gz", out / "good.nii.gz")
  assert_same_geometry(root / "good" / "t1w.nii.gz", out / "good_std.nii.gz")
  index = json.loads((out / infer.INDEX).read_text())
  assert list(index["subjects"]) == ["good"] and list(index["failed"]) == ["broken"]


@pytest.mark.parametrize("case", ["missing input", "missing checkpoint", "not a run"])
def test_bad_input_is_one_line_naming_it(run, tmp_path, capsys, case):
  source = write(tmp_path / "t1w.nii.gz", np.random.default_rng(0).random((8, 8, 4)),
                 SPACING)
  argv = ["--workdir", str(run), "--input", str(source), "--output",
          str(tmp_path / "out.nii.gz")]
  named = {"missing input": "nowhere.nii.gz", "missing checkpoint": "999",
           "not a run": "config.json"}[case]
  if case == "missing input":
    argv[3] = str(tmp_path / "nowhere.nii.gz")
  elif case == "missing checkpoint":
    argv += ["--checkpoint", "999"]
  else:
    argv[1] = str(tmp_path)
  assert cli.main(["medjax", "translate", *argv]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("medjax translate: error:") and named in err
  assert len(err.splitlines()) == 1


def test_an_ensemble_of_two_copies_of_a_run_is_that_run(run, tmp_path, capsys):
  """Directory mode with --workdir RUN COPY: the same mean (members share their draws'
  keys), the std the mixture law gives, every member in the index."""
  copy = tmp_path / "copy"
  shutil.copytree(run, copy)
  data = phantom.generate(0, 1, shape=(32, 32, 12), spacing=SPACING)
  root = tmp_path / "data"
  (root / "s").mkdir(parents=True)
  write(root / "s" / "t1w.nii.gz", data["t1w"], SPACING)
  outputs = {}
  for name, workdirs in (("one", [run]), ("two", [run, copy])):
    out = tmp_path / name
    assert cli.main(["medjax", "translate", "--workdir", *map(str, workdirs), "--input-dir",
                     str(root), "--layout", "phantom", "--output-dir", str(out),
                     "--samples", "2"]) == 0
    outputs[name] = [nib.load(out / f"s{suffix}.nii.gz").get_fdata()
                     for suffix in ("", "_std")]
    index = json.loads((out / infer.INDEX).read_text())
    assert [m["workdir"] for m in index["model"]["members"]] == list(map(str, workdirs))
    assert index["model"]["tta"] == "none"
  (mean, std), (ensemble_mean, ensemble_std) = outputs["one"], outputs["two"]
  assert std.max() > 0
  np.testing.assert_allclose(ensemble_mean, mean, atol=1e-5)
  np.testing.assert_allclose(ensemble_std, sliding.combine([mean, mean], [std, std])[1],
                             atol=1e-5)


def test_runs_that_differ_do_not_ensemble(run, tmp_path, capsys):
  other = tmp_path / "other"
  shutil.copytree(run, other)
  config = json.loads((other / "config.json").read_text())
  config["data"]["target"] = "pd"
  (other / "config.json").write_text(json.dumps(config))
  assert cli.main(["medjax", "translate", "--workdir", str(run), str(other), "--input",
                   str(other / "config.json"),
                   "--output", str(tmp_path / "out.nii.gz")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(run) in err and str(other) in err
  assert "target (t2w vs pd)" in err and not (tmp_path / "out.nii.gz").exists()


def test_flip_tta_is_the_mixture_of_the_input_and_its_mirror(run):
  """2D: tta 'none' is the slice path as it was; 'flip' adds the prediction on the
  volume mirrored along H (augment.MIRROR_AXES), drawn with fold_in(rng, 1)."""
  loaded = Run.load(run)
  source = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 1)).astype(np.float32)
  rng = jax.random.PRNGKey(3)
  size = parallel.balanced_batch(5, loaded.config.eval.batch_size, loaded.mesh.size)
  direct = evaluate.translate_volume(loaded.translate_fn(), loaded.params, source, rng,
                                     loaded.mesh, size)
  none = evaluate.predict_volume(loaded, source, rng, tta="none")
  np.testing.assert_array_equal(none.mean, direct.mean)
  np.testing.assert_array_equal(none.std, direct.std)
  mirrored = evaluate.translate_volume(loaded.translate_fn(), loaded.params,
                                       np.ascontiguousarray(source[:, ::-1]),
                                       jax.random.fold_in(rng, 1), loaded.mesh, size)
  flip = evaluate.predict_volume(loaded, source, rng, tta="flip")
  m = np.stack([direct.mean, mirrored.mean[:, ::-1]]).astype(np.float64)
  s = np.stack([direct.std, mirrored.std[:, ::-1]]).astype(np.float64)
  np.testing.assert_allclose(flip.mean, m.mean(0), atol=1e-6)
  np.testing.assert_allclose(flip.std, np.sqrt(np.maximum((s ** 2 + m ** 2).mean(0)
                                                          - m.mean(0) ** 2, 0)), atol=1e-5)
  assert not np.allclose(flip.mean, direct.mean, atol=1e-4)  # the mirror did change it
