"""The data world is the same bytes every time the command generates it (and so are its dataset
fingerprints): two runs of identical commands can be told identical from their result files.

Each generation runs `totobench data synth` in its own fresh process, in its own home folder, as a
user's first run does. Known gap (issue 22): generated inside a process that has already done other
work (the session's `tiny_world` fixture, made in pytest's process), some Kinetics clips come out
with other bytes - the rendering depends on the process's heap history - so this compares fresh
processes, and the fixture is not used here."""

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


def test_two_generations_are_byte_identical(tmp_path):
    first_root, second_root = _generate(tmp_path, "a"), _generate(tmp_path, "b")
    first, second = _digests(first_root), _digests(second_root)
    assert sorted(first) == sorted(second) and len(first) > 100
    differ = [name for name in first if first[name] != second[name]]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:3]}"
    assert KineticsIndex(first_root / "kinetics400", "val").fingerprint() == \
        KineticsIndex(second_root / "kinetics400", "val").fingerprint()
