"""The data world is the same bytes every time it is generated (and so are its dataset fingerprints):
two runs of identical commands can be told identical from their result files."""

import hashlib

from totobench.data.kinetics import KineticsIndex
from totobench.data.synth import synth


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_generations_are_byte_identical(tiny_world, tmp_path):
    again = tmp_path / "again" / "tiny"
    synth(again, seed=0, size="tiny")
    first, second = _digests(tiny_world), _digests(again)
    assert sorted(first) == sorted(second)
    differ = [name for name in first if first[name] != second[name]]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:3]}"
    assert KineticsIndex(again / "kinetics400", "val").fingerprint() == \
        KineticsIndex(tiny_world / "kinetics400", "val").fingerprint()
