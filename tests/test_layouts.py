"""Each layout finds the right subjects and modality files, and notes what is missing."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest_data import touch  # noqa: E402

from medjax import modalities  # noqa: E402
from medjax.data import layouts  # noqa: E402


def ids(subjects):
  return [s.id for s in subjects]


def test_synthrad2023_tasks_and_groups(tmp_path):
  for task, anatomy, sid, mods in [("Task1", "brain", "1BA001", "mr ct mask"),
                                   ("Task1", "pelvis", "1PA004", "mr ct"),
                                   ("Task2", "brain", "2BA002", "cbct ct mask")]:
    for m in mods.split():
      touch(tmp_path / task / anatomy / sid / f"{m}.nii.gz")
  touch(tmp_path / "Task1" / "overview.xlsx")
  subjects = {s.id: s for s in layouts.find_subjects("synthrad2023", tmp_path)}
  assert sorted(subjects) == ["1BA001", "1PA004", "2BA002"]
  assert set(subjects["1BA001"].files) == {"mr", "ct", "mask"}
  assert subjects["2BA002"].group == "Task2/brain"
  assert set(subjects["2BA002"].files) == {"cbct", "ct", "mask"}
  assert subjects["1PA004"].issues == ("missing mask",)
  assert subjects["1BA001"].files["mr"] == tmp_path / "Task1/brain/1BA001/mr.nii.gz"


def test_synthrad2025_reads_mha_names(tmp_path):
  for m in ("mr", "ct", "mask"):
    touch(tmp_path / "Task1" / "HN" / "1HNA001" / f"{m}.mha")
  (subject,) = layouts.find_subjects("synthrad2025", tmp_path)
  assert subject.id == "1HNA001" and subject.files["ct"].suffix == ".mha"


def test_brats2021(tmp_path):
  for sid in ("BraTS2021_00000", "BraTS2021_00002"):
    for m in ("t1", "t1ce", "t2", "flair", "seg"):
      if sid.endswith("2") and m == "t2":
        continue
      touch(tmp_path / "TrainingData" / sid / f"{sid}_{m}.nii.gz")
  subjects = layouts.find_subjects("brats2021", tmp_path)
  assert ids(subjects) == ["BraTS2021_00000", "BraTS2021_00002"]
  assert set(subjects[0].files) == {"t1w", "t1c", "t2w", "flair", "seg"}
  assert subjects[1].missing(["t1w", "t2w"]) == ["t2w"]
  assert "missing t2w" in subjects[1].issues


def test_brats2023(tmp_path):
  sid = "BraTS-GLI-00000-000"
  for m in ("t1n", "t1c", "t2w", "t2f", "seg"):
    touch(tmp_path / sid / f"{sid}-{m}.nii.gz")
  (subject,) = layouts.find_subjects("brats2023", tmp_path)
  assert subject.id == sid and subject.group == "GLI"
  assert set(subject.files) == {"t1w", "t1c", "t2w", "flair", "seg"}
  assert subject.files["flair"].name == f"{sid}-t2f.nii.gz"


def test_ixi_joins_contrast_folders(tmp_path):
  for contrast in ("T1", "T2", "PD"):
    touch(tmp_path / f"IXI-{contrast}" / f"IXI002-Guys-0828-{contrast}.nii.gz")
  touch(tmp_path / "IXI-T1" / "IXI012-HH-1211-T1.nii.gz")
  touch(tmp_path / "IXI-MRA" / "IXI002-Guys-0828-MRA.nii.gz")
  subjects = layouts.find_subjects("ixi", tmp_path)
  assert ids(subjects) == ["IXI002-Guys-0828", "IXI012-HH-1211"]
  assert set(subjects[0].files) == {"t1w", "t2w", "pd"} and subjects[0].group == "Guys"
  assert subjects[1].missing(["t1w", "t2w"]) == ["t2w"]


def test_bids_sessions_share_a_patient(tmp_path):
  touch(tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz")
  touch(tmp_path / "sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz")
  touch(tmp_path / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz")
  touch(tmp_path / "sub-02/anat/sub-02_T1w.nii.gz")
  touch(tmp_path / "sub-02/anat/sub-02_run-2_T1w.nii.gz")
  touch(tmp_path / "sub-02/anat/sub-02_FLAIR.nii.gz")
  touch(tmp_path / "sub-02/anat/sub-02_PDw.json")
  touch(tmp_path / "derivatives/sub-01/anat/sub-01_T1w.nii.gz")
  subjects = {s.id: s for s in layouts.find_subjects("bids", tmp_path)}
  assert sorted(subjects) == ["sub-01_ses-1", "sub-01_ses-2", "sub-02"]
  assert subjects["sub-01_ses-1"].split_key == subjects["sub-01_ses-2"].split_key == "sub-01"
  assert set(subjects["sub-02"].files) == {"t1w", "flair"}
  assert subjects["sub-02"].files["t1w"].name == "sub-02_T1w.nii.gz"
  assert any("2 t1w files" in i for i in subjects["sub-02"].issues)


def test_phantom(tmp_path):
  for s in range(2):
    for m in ("t1w", "t2w", "pd", "flair", "ct", "cbct", "mask", "ct_aligned", "cbct_aligned",
              "labels"):
      touch(tmp_path / f"phantom_{s:03d}" / f"{m}.nii.gz")
  subjects = layouts.find_subjects("phantom", tmp_path)
  assert ids(subjects) == ["phantom_000", "phantom_001"]
  # The *_aligned truth of `medjax phantom --misalign` is no modality: ignored. The tissue
  # labels are the subject's `seg` (what `medjax score --segmentation` reads).
  assert set(subjects[1].files) == {"t1w", "t2w", "pd", "flair", "ct", "cbct", "mask", "seg"}
  assert subjects[1].files["seg"].name == "labels.nii.gz"
  assert subjects[1].files["ct"].name == "ct.nii.gz" and not subjects[1].issues


def test_csv_manifest(tmp_path):
  touch(tmp_path / "a_t1.nii.gz")
  touch(tmp_path / "a_t2.nii.gz")
  touch(tmp_path / "b_t1.nii.gz")
  (tmp_path / "list.csv").write_text(
      "subject,site,T1,t2w\n"
      "a,HH,a_t1.nii.gz,a_t2.nii.gz\n"
      "b,,b_t1.nii.gz,\n"
      f"c,IOP,{tmp_path / 'gone.nii.gz'},a_t2.nii.gz\n")
  subjects = {s.id: s for s in layouts.find_subjects("csv", tmp_path / "list.csv")}
  assert sorted(subjects) == ["a", "b", "c"]
  assert subjects["a"].files == {"t1w": tmp_path / "a_t1.nii.gz", "t2w": tmp_path / "a_t2.nii.gz"}
  assert (subjects["a"].group, subjects["b"].group) == ("HH", None)
  assert subjects["b"].missing(["t1w", "t2w"]) == ["t2w"]
  assert "t1w" not in subjects["c"].files and "does not exist" in subjects["c"].issues[0]
  # A folder with one .csv in it works too.
  assert ids(layouts.find_subjects("csv", tmp_path)) == ["a", "b", "c"]


def test_modality_names():
  for spellings, name in [(("t1", "T1n", "T1w"), "t1w"), (("t1ce", "t1c"), "t1c"),
                          (("t2", "T2w"), "t2w"), (("FLAIR", "t2f"), "flair"),
                          (("PD", "PDw"), "pd"), (("ct",), "ct"), (("cbct",), "cbct")]:
    assert {modalities.canonical(s) for s in spellings} == {name}
  assert modalities.canonical(" T1w ") == "t1w"  # a CSV header cell with spaces
  with pytest.raises(ValueError, match="unknown modality"):
    modalities.canonical("dwi")
  # CT and CBCT keep HU; every MR contrast does not.
  assert [m for m in modalities.IMAGES if modalities.is_ct(m)] == ["ct", "cbct"]
  assert modalities.as_tuple("t1w") == ("t1w",)
  assert modalities.as_tuple(["t1w", "pd"]) == ("t1w", "pd")


def test_errors_name_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match="brats2021.*ixi"):
    layouts.find_subjects("nope", tmp_path)
  with pytest.raises(FileNotFoundError, match="missing_folder"):
    layouts.find_subjects("ixi", tmp_path / "missing_folder")
