"""benchmarks/report.py: a failing or hanging benchmark is reported, never a crash."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def test_ok_script_keeps_its_ratio_lines(report, tmp_path):
    script = write_script(tmp_path, "fine.py", "print('warming up')\nprint('ratio: 3.50x')\nprint('done')\n")
    record = report.run_benchmark(script, [], timeout_s=60)
    assert record["status"] == "ok" and record["returncode"] == 0
    assert record["figures"] == ["ratio: 3.50x"]
    assert "warming up" in record["output"]


def test_failing_script_is_reported_with_its_error(report, tmp_path):
    script = write_script(tmp_path, "broken.py", "print('ratio: 2.0x')\nraise ValueError('no such layer 9')\n")
    record = report.run_benchmark(script, [], timeout_s=60)
    assert record["status"] == "failed" and record["returncode"] == 1
    assert record["error"] == "ValueError: no such layer 9"
    assert record["figures"] == []  # figures of a failed run are not reported as results
    state = {"machine": {}, "benchmarks": {"broken.py": record}, "e2e": {}}
    md = report.render_markdown(state, "report.py --test")
    assert "**failed**: ValueError: no such layer 9" in md


def test_hanging_script_is_killed_at_its_time_limit(report, tmp_path):
    script = write_script(tmp_path, "hang.py", "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    start = time.perf_counter()
    record = report.run_benchmark(script, [], timeout_s=2)
    assert time.perf_counter() - start < 20
    assert record["status"] == "timeout"
    assert record["error"] == "did not finish within 2 s (killed)"
    assert "started" in record["output"]


def test_end_to_end_section_marks_the_target(report):
    run = {"mode": "quick", "command": "totobench run --quick", "status": "ok", "wall_s": 150.0, "target_s": 120,
           "user_s": 200.0, "sys_s": 10.0, "max_rss_mb": 812.0, "cache_mb": 3.0, "load_before": "1.0 / 1.0 / 1.0",
           "load_after": "2.0 / 1.0 / 1.0", "measured": "now",
           "tasks": [{"task": "imagenet", "seconds": 100.0, "main_metric": "top1", "best_layer": 3,
                      "best_value": 0.25, "layers": 8}]}
    md = report.render_markdown({"machine": {}, "benchmarks": {}, "e2e": {"quick": run}}, "report.py")
    row = next(line for line in md.splitlines() if line.startswith("| `totobench run --quick`"))
    assert "| 150 s (2.5 min) | 120 s (2.0 min) | no |" in row and "812 MB" in row
    assert "| imagenet | 100 | 8 | 3 | top1 = 0.2500 |" in md


def test_partial_runs_keep_each_others_sections(report, tmp_path, monkeypatch):
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    write_script(scripts, "fast.py", "print('speed-up: 12.0x')\n")
    write_script(scripts, "broken.py", "import sys\nsys.exit('cannot open checkpoint')\n")
    monkeypatch.setattr(report, "HERE", scripts)
    out = scripts / "REPORT.md"
    assert report.main(["--skip-e2e", "--benchmarks", "fast", "--out", str(out)]) == 0
    assert report.main(["--skip-e2e", "--benchmarks", "broken", "--out", str(out), "--note", "second run"]) == 0
    state = json.loads(out.with_suffix(".json").read_text())
    assert sorted(state["benchmarks"]) == ["broken.py", "fast.py"]
    assert state["benchmarks"]["broken.py"]["error"] == "cannot open checkpoint"
    md = out.read_text()
    assert "- fast.py: `speed-up: 12.0x`" in md
    assert "**failed**: cannot open checkpoint" in md and "- second run (" in md
    assert report.main(["--skip-e2e", "--benchmarks", "nope", "--out", str(out)]) == 2
