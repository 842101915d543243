"""The data world is the same bytes every time the command generates it (and so are its dataset
fingerprints): two runs of identical commands can be told identical from their result files.

Each generation runs `totobench data synth` in its own fresh process, in its own home folder, as a
user's first run does; the session's `tiny_world` fixture, made inside pytest's busy process, must
give the same bytes too. (Before write_mp4 zeroed x264's fresh memory, 4 to 13 of its Kinetics clips
differed: x264's lookahead reads memory it never wrote, see totobench/host.py.)"""

import hashlib
import os
import subprocess
import sys

from totobench.data.kinetics import KineticsIndex


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _generate(tmp_path, name):
    home = tmp_path / name / "home"
    out = tmp_path / name / "tiny"
    env = dict(os.environ, HOME=str(home), TOTOBENCH_HOME=str(home / "totobench"))
    subprocess.run([sys.executable, "-m", "totobench", "data", "synth", "--out", str(out), "--size", "tiny"],
                   env=env, check=True, capture_output=True)
    return out


def _assert_identical(first_root, second_root):
    first, second = _digests(first_root), _digests(second_root)
    assert sorted(first) == sorted(second) and len(first) > 100
    differ = [name for name in first if first[name] != second[name]]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:3]}"
    assert KineticsIndex(first_root / "kinetics400", "val").fingerprint() == \
        KineticsIndex(second_root / "kinetics400", "val").fingerprint()


def test_generations_in_fresh_processes_and_inside_pytest_are_byte_identical(tmp_path, tiny_world):
    first_root, second_root = _generate(tmp_path, "a"), _generate(tmp_path, "b")
    _assert_identical(first_root, second_root)
    _assert_identical(first_root, tiny_world)
