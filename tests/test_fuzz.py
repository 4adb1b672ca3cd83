"""Property-based fuzzing of every reader (issue 15): success with sane output, or the
documented one-line error naming the file; never a traceback, never a hang.

The inputs and the judgement live in tests/fuzz_inputs.py (benchmarks/robustness.py
counts the same generators). hypothesis draws every choice, with a fixed seed
(`derandomize`), so a run tries the same files every time; a failure shrinks to a minimal
input, whose files are printed (path, size, base64) with the `@reproduce_failure` blob.

Tiers: `test_reader` tries FAST inputs per reader (the fast tier); `test_reader_hundreds`
(slow) tries SLOW. A reader that could kill the process (the C++ readers of .mha and
.array_record files) is also run in a child process, where a crash is a failed test
rather than a dead test run.
"""

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import fuzz_inputs  # noqa: E402

FAST, SLOW = 6, 200  # inputs per reader
HANG_S = 10.0  # an input still being read after this long is a hang (SIGALRM)


def fuzz(name: str, examples: int, scratch: Path) -> None:
  reader = fuzz_inputs.READERS[name]
  folder = scratch / name

  @settings(max_examples=examples, derandomize=True, database=None, print_blob=True,
            deadline=timedelta(seconds=5), phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck))
  @given(st.data())
  def keeps_the_contract(data):
    outcome = fuzz_inputs.attempt(reader, fuzz_inputs.HypothesisPick(data), folder, HANG_S)
    if not outcome.kept_the_contract:
      note(f"the input ({folder}, left on disk):\n{fuzz_inputs.describe_input(folder)}")
    assert outcome.kept_the_contract, f"{name}: {outcome.kind}: {outcome.detail}"

  keeps_the_contract()


@pytest.mark.parametrize("name", list(fuzz_inputs.READERS))
def test_reader(name, tmp_path):
  fuzz(name, FAST, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(fuzz_inputs.READERS))
def test_reader_hundreds(name, tmp_path):
  fuzz(name, SLOW, tmp_path)


CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import fuzz_inputs
result = fuzz_inputs.tally({names!r}, examples={examples}, seed=1, scratch={scratch!r})
print(json.dumps(result))
"""


@pytest.mark.parametrize("examples", [pytest.param(40, id="fast"),
                                      pytest.param(300, id="hundreds", marks=pytest.mark.slow)])
def test_native_readers_never_kill_the_process(tmp_path, examples):
  """ITK (MetaImage) and array_record (Riegeli) are C++: damage they do not expect could
  abort or crash the process, which no exception handler sees. The released medjax
  (before issue 15) did: SimpleITK aborted or segfaulted within a few hundred damaged
  .mha files (truncated pixel data, HeaderSize past the end)."""
  names = ["mha", "shard", "shard_slices", "split"]
  code = CHILD.format(tests=str(Path(__file__).parent), names=names, examples=examples,
                      scratch=str(tmp_path))
  child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
  assert child.returncode == 0, (child.returncode, child.stderr[-3000:])
  result = json.loads(child.stdout.strip().splitlines()[-1])
  for name in names:
    counts = result[name]
    assert counts["tried"] == examples
    assert counts["ok"] + counts["refused"] == examples, (name, counts)
