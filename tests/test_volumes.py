"""Loading, reorientation, resampling, masks and the preprocessing path, against
nibabel/numpy computed apart."""

import sys
from pathlib import Path

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
from conftest_data import SHAPE, affine, body, corrupt_gzip, mr_volume, save, truncate  # noqa: E402

from medjax.data import layouts, mask, volumes  # noqa: E402
from medjax.errors import UserError  # noqa: E402
from medjax.data.preprocess import Recipe, preprocess, to_original, with_context  # noqa: E402


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def test_load_returns_what_nibabel_reads(tmp_path, rng):
  data, a = mr_volume(rng), affine(angle_deg=20, flips=(-1, 1, 1))
  path = save(tmp_path / "t1.nii.gz", data, a)
  loaded, loaded_affine = volumes.load(path)
  np.testing.assert_array_equal(loaded, data)
  np.testing.assert_allclose(loaded_affine, nib.load(path).affine)
  # A 4D file with one frame is a 3D volume.
  save(tmp_path / "one_frame.nii.gz", data[..., None], a)
  assert volumes.load(tmp_path / "one_frame.nii.gz")[0].shape == SHAPE


@pytest.mark.parametrize("damage, reason", [
    (corrupt_gzip, "corrupt gzip"),
    (truncate, "truncated"),
])
def test_load_names_damaged_files(tmp_path, rng, damage, reason):
  path = save(tmp_path / "ct.nii.gz", mr_volume(rng))
  damage(path)
  with pytest.raises(volumes.VolumeError, match=reason) as error:
    volumes.load(path)
  # The whole path, then the reason; a user error (exit status 2), not a crash.
  assert str(error.value).startswith(f"{path}: {reason}")
  assert isinstance(error.value, UserError) and error.value.exit_status == 2


def test_load_refuses_4d_and_nan(tmp_path, rng):
  save(tmp_path / "dwi.nii.gz", rng.random(SHAPE + (3,)))
  with pytest.raises(volumes.VolumeError, match=r"dwi.nii.gz: 4D"):
    volumes.load(tmp_path / "dwi.nii.gz")
  data = mr_volume(rng)
  data[3, 4, 5] = np.nan
  data[1, 1, 1] = np.inf
  save(tmp_path / "nan.nii.gz", data)
  with pytest.raises(volumes.VolumeError, match="2 NaN/inf voxels"):
    volumes.load(tmp_path / "nan.nii.gz")
  with pytest.raises(volumes.VolumeError, match="does not exist"):
    volumes.load(tmp_path / "absent.nii.gz")


def test_mha_loads_like_the_same_nifti(tmp_path, rng):
  import SimpleITK as sitk
  a = affine(spacing=(0.9, 1.1, 2.0), angle_deg=15, flips=(-1, 1, 1))
  nifti = save(tmp_path / "mr.nii.gz", mr_volume(rng), a)
  # ITK converts NIfTI's RAS to its LPS itself: an independent path to the .mha.
  sitk.WriteImage(sitk.ReadImage(str(nifti)), str(tmp_path / "mr.mha"))
  data, mha_affine = volumes.load(tmp_path / "mr.mha")
  np.testing.assert_array_equal(data, nib.load(nifti).get_fdata(dtype=np.float32))
  np.testing.assert_allclose(mha_affine, a, atol=1e-5)


def test_to_ras_matches_nibabel_canonical(rng):
  data, a = mr_volume(rng), affine(angle_deg=30, flips=(-1, -1, 1))
  ras, ras_affine = volumes.to_ras(data, a)
  canonical = nib.as_closest_canonical(nib.Nifti1Image(data, a))
  np.testing.assert_array_equal(ras, canonical.get_fdata(dtype=np.float32))
  np.testing.assert_allclose(ras_affine, canonical.affine)


def test_resample_matches_nibabel_processing(rng):
  data = ndimage.gaussian_filter(rng.random(SHAPE), 2).astype(np.float32)
  source_affine = affine(spacing=(1.2, 0.9, 2.0), angle_deg=25)
  grid_affine, grid_shape = affine(), (20, 22, 10)
  ours = volumes.resample(data, source_affine, grid_affine, grid_shape, order=1)
  theirs = nibabel.processing.resample_from_to(
      nib.Nifti1Image(data, source_affine), (grid_shape, grid_affine), order=1)
  np.testing.assert_allclose(ours, theirs.get_fdata(), atol=1e-5)


def test_resized_grid_keeps_the_field_of_view():
  a = affine(spacing=(1.0, 1.0, 3.0), angle_deg=10)
  grid, shape = volumes.resized_grid(a, (24, 24, 12), (2.0, 2.0, 1.5))
  assert shape == (12, 12, 24)
  np.testing.assert_allclose(volumes.voxel_spacing(grid), [2.0, 2.0, 1.5])
  # The outer corner of the first voxel stays in place.
  np.testing.assert_allclose(grid @ [-0.5, -0.5, -0.5, 1], a @ [-0.5, -0.5, -0.5, 1])
  np.testing.assert_allclose(grid @ [11.5, 11.5, 23.5, 1], a @ [23.5, 23.5, 11.5, 1])


def test_body_mask_keeps_the_largest_component_and_fills_holes(rng):
  truth = body()
  image = np.where(truth, 100.0 + 30 * rng.random(SHAPE), 0.0)
  image[10:14, 10:14, 5:7] = 0.0  # a dark cavity inside
  image[0:2, 0:2, 0:2] = 150.0  # a bright speck outside
  np.testing.assert_array_equal(mask.body_mask(image), truth)


def write_subject(folder, rng, *, t2_affine=None, t2_shape=SHAPE):
  """t1w on an oblique grid; t2w = the same smooth world-space field on its own grid."""
  t1_affine = affine(spacing=(1.0, 1.0, 2.0), angle_deg=12, flips=(-1, 1, 1))
  field = lambda xyz: 200 + 100 * np.sin(xyz[0] / 4) * np.cos(xyz[1] / 5) + xyz[2]  # noqa: E731

  def sample(a, shape):
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), 0).reshape(3, -1)
    xyz = a[:3, :3] @ ijk + a[:3, 3:]
    return field(xyz).reshape(shape).astype(np.float32)

  head = body()
  save(folder / "t1w.nii.gz", sample(t1_affine, SHAPE) * head, t1_affine)
  save(folder / "mask.nii.gz", head, t1_affine, np.uint8)
  t2_affine = t1_affine if t2_affine is None else t2_affine
  save(folder / "t2w.nii.gz", sample(t2_affine, t2_shape), t2_affine)
  return layouts.find_subjects("phantom", folder.parent)[0], sample, t1_affine


def test_off_grid_modality_lands_where_its_affine_says(tmp_path, rng):
  t2_affine = affine(spacing=(0.8, 0.8, 1.5), angle_deg=-20, shape=(36, 36, 18))
  t2_affine[:3, 3] += (1.0, -2.0, 0.5)
  subject, sample, _ = write_subject(tmp_path / "s0", rng, t2_affine=t2_affine,
                                     t2_shape=(36, 36, 18))
  recipe = Recipe(sources=["t1w"], targets=["t2w"], spacing=(1.5, 1.5, 2.0), size=(24, 24))
  prepared = preprocess(subject.files, recipe, subject_id=subject.id)
  assert prepared.geometry["off_grid"] == ["t2w"]
  # Independent: the field sampled directly on the prepared grid, normalised the same way.
  g = prepared.geometry
  grid = np.asarray(g["grid_affine"])
  truth = sample(grid, tuple(g["grid_shape"]))
  params = prepared.normalisation["t2w"]
  unit = np.clip(2 * (truth - params["lo"]) / (params["hi"] - params["lo"]) - 1, -1, 1)
  start = g["crop_start"]
  expected = volumes.window(unit, start, g["size"], -1.0)
  got = np.moveaxis(prepared.target[..., 0], 0, 2)
  inside = volumes.window(np.moveaxis(prepared.mask[..., 0], 0, 2), [0, 0], g["size"], 0) > 0
  inside = ndimage.binary_erosion(inside, iterations=1)
  # Linear interpolation of a smooth field: small error, nothing like a misplacement.
  assert np.abs(got - expected)[inside].mean() < 0.02


def test_prepared_volume_returns_to_the_original_grid(tmp_path, rng):
  subject, _, t1_affine = write_subject(tmp_path / "s0", rng)
  recipe = Recipe(sources=["t1w"], targets=["t2w"], spacing=(1.0, 1.0, 2.0), size=(28, 20))
  prepared = preprocess(subject.files, recipe, subject_id=subject.id)
  back = to_original(prepared.target, prepared.geometry)
  original = nib.load(subject.files["t2w"]).get_fdata()
  params = prepared.normalisation["t2w"]
  unit = np.clip(2 * (original - params["lo"]) / (params["hi"] - params["lo"]) - 1, -1, 1)
  # Native spacing: no interpolation, so everything inside the crop window is exact.
  inside = back != -1.0
  assert inside.mean() > 0.6
  np.testing.assert_allclose(back[inside], unit[inside], atol=1e-5)
  np.testing.assert_allclose(prepared.geometry["original_affine"], t1_affine)


def test_rigid_registration_recovers_a_rotation(tmp_path, rng):
  import SimpleITK  # noqa: F401  (the rigid path needs it)
  shape = (32, 32, 24)
  x, y, z = np.meshgrid(*(np.arange(n) - n / 2 for n in shape), indexing="ij")
  image = (np.exp(-((x - 3) ** 2 / 40 + y ** 2 / 60 + z ** 2 / 30))
           + 0.6 * np.exp(-((x + 5) ** 2 + (y - 4) ** 2 + (z + 2) ** 2) / 12)).astype(np.float32)
  fixed_affine = affine(shape=shape)
  # The moving image's header claims the wrong pose: off by 8° and 2 mm.
  truth = np.eye(4)
  truth[:3, :3], truth[:3, 3] = affine(angle_deg=8)[:3, :3], (2.0, 0.0, 0.0)
  moving_affine = truth @ fixed_affine
  world = volumes.register_rigid(image, fixed_affine, image, moving_affine)
  np.testing.assert_allclose(world[:3, :3], truth[:3, :3], atol=0.02)  # ~1°
  np.testing.assert_allclose(world[:3, 3], truth[:3, 3], atol=0.2)  # mm


def test_register_rigid_corrects_a_wrong_header(tmp_path, rng):
  """IXI's case: a modality on another grid whose header pose is off."""
  import SimpleITK  # noqa: F401  (the rigid path needs it)
  shape = (32, 32, 24)
  x, y, z = np.meshgrid(*(np.arange(n) - n / 2 for n in shape), indexing="ij")
  mask = (x / 13) ** 2 + (y / 11) ** 2 + (z / 9) ** 2 < 1
  image = np.where(mask, 100 + 80 * np.exp(-((x - 4) ** 2 + (y + 3) ** 2 + z ** 2) / 20)
                   + 40 * (x > 2), 0).astype(np.float32)
  a = affine(shape=shape)
  save(tmp_path / "s" / "t2w.nii.gz", image, a)
  save(tmp_path / "s" / "mask.nii.gz", mask, a, np.uint8)
  wrong = np.eye(4)
  wrong[:3, :3], wrong[:3, 3] = affine(angle_deg=6)[:3, :3], (1.5, -1.0, 0.0)
  save(tmp_path / "s" / "t1w.nii.gz", image, wrong @ a)  # same voxels, header off
  subject = layouts.find_subjects("phantom", tmp_path)[0]
  plain = preprocess(subject.files, Recipe(sources=["t2w"], targets=["t1w"], size=(32, 32)))
  fixed = preprocess(subject.files, Recipe(sources=["t2w"], targets=["t1w"], size=(32, 32),
                                           register="rigid"))
  assert fixed.geometry["registered"] == ["t1w"] and plain.geometry["registered"] == []
  error = lambda p: np.abs(p.target - p.source)[p.mask[..., 0] > 0].mean()  # noqa: E731
  assert error(fixed) < 0.3 * error(plain)


def test_with_context_stacks_clamped_neighbours_modality_major(rng):
  source = rng.random((5, 3, 4, 2)).astype(np.float32)  # (Z, H, W, modalities)
  stacked = with_context(source, 2)
  assert stacked.shape == (5, 3, 4, 10)
  for z in range(5):
    channel = 0
    for m in range(2):
      for offset in range(-2, 3):
        near = min(max(z + offset, 0), 4)  # the volume's end slices repeat
        np.testing.assert_array_equal(stacked[z, ..., channel], source[near, ..., m])
        channel += 1
  assert with_context(source, 0) is source


def test_translating_reads_only_the_sources(tmp_path, rng):
  """`targets=False` (what `medjax translate` runs) never opens the target file."""
  subject, _, _ = write_subject(tmp_path / "s0", rng)
  recipe = Recipe(sources=["t1w"], targets=["t2w"], spacing=(1.0, 1.0, 2.0), size=(24, 24))
  paired = preprocess(subject.files, recipe, subject_id="s0")
  corrupt_gzip(subject.files["t2w"])
  with pytest.raises(volumes.VolumeError, match="t2w.nii.gz: corrupt gzip"):
    preprocess(subject.files, recipe, subject_id="s0")
  alone = preprocess({"t1w": subject.files["t1w"], "mask": subject.files["mask"]}, recipe,
                     targets=False)
  assert alone.target is None and set(alone.normalisation) == {"t1w"}
  np.testing.assert_array_equal(alone.source, paired.source)
  np.testing.assert_array_equal(alone.mask, paired.mask)
  with pytest.raises(volumes.VolumeError, match="missing modality t2w"):
    preprocess({"t1w": subject.files["t1w"]}, recipe, subject_id="s0")


def test_an_empty_mask_file_is_named(tmp_path, rng):
  subject, _, t1_affine = write_subject(tmp_path / "s0", rng)
  save(subject.files["mask"], np.zeros(SHAPE), t1_affine, np.uint8)
  recipe = Recipe(sources=["t1w"], targets=["t2w"], size=(24, 24))
  with pytest.raises(volumes.VolumeError, match="mask.nii.gz: empty body mask"):
    preprocess(subject.files, recipe)


def test_save_like_keeps_the_reference_header(tmp_path, rng):
  a = affine(spacing=(0.9, 1.1, 2.0), angle_deg=15, flips=(-1, 1, 1))
  reference = nib.Nifti1Image(mr_volume(rng).astype(np.int16), a)
  reference.set_qform(a, code=1)  # scanner
  reference.set_sform(a, code=2)  # aligned
  reference.header.set_xyzt_units("mm", "sec")
  nib.save(reference, tmp_path / "ref.nii.gz")
  volume = rng.random(SHAPE).astype(np.float32)
  volumes.save_like(volume, tmp_path / "ref.nii.gz", tmp_path / "out" / "pred.nii.gz")
  written = nib.load(tmp_path / "out" / "pred.nii.gz")
  np.testing.assert_array_equal(np.asarray(written.dataobj), volume)
  assert written.get_data_dtype() == np.float32
  np.testing.assert_allclose(written.affine, a, atol=1e-5)
  assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
  np.testing.assert_allclose(written.header.get_zooms(), (0.9, 1.1, 2.0), rtol=1e-6)
  assert written.header.get_xyzt_units() == ("mm", "sec")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pred.nii.gz"]
  with pytest.raises(UserError, match="pred.mha: output must be a .nii"):
    volumes.save_like(volume, tmp_path / "ref.nii.gz", tmp_path / "out" / "pred.mha")
