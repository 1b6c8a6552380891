"""BENCHMARKS.md and the README's benchmark summary are written from committed results only:
regenerating them from bench/results gives the committed files byte for byte."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import report  # noqa: E402


def test_benchmarks_md_regenerates_byte_for_byte_from_committed_results():
    text, blocks = report.render()
    assert (ROOT / "BENCHMARKS.md").read_text() == text
    readme = (ROOT / "README.md").read_text()
    assert set(blocks) == set(report.BLOCKS)
    for block in blocks.values():
        assert block in readme


def test_every_section_has_a_committed_result_from_a_quiet_machine():
    for section in report.SECTIONS:
        found = report.latest(section)
        assert found is not None, f"no committed result for benchmark section {section}"
        name, result = found
        assert result["section"] == section
        assert result["machine_load"]["alone"], f"{name} was measured on a busy machine"


def test_every_figure_the_readme_quotes_in_its_summary_is_in_benchmarks_md():
    _, blocks = report.render()
    text = (ROOT / "BENCHMARKS.md").read_text()
    numbers = re.findall(r"\*\*([0-9.]+)[×%]?\*\*", blocks["bench"])
    assert numbers
    for number in numbers:
        assert number in text, number


def test_every_figure_of_the_readme_vllm_table_is_in_benchmarks_md():
    _, blocks = report.render()
    text = (ROOT / "BENCHMARKS.md").read_text()
    rows = [line for line in blocks["bench-vllm"].splitlines() if re.match(r"\| \d", line)]
    assert len(rows) == 3  # batch 1, 8, 32
    for row in rows:
        for number in re.findall(r"\d+\.\d+", row):
            assert number in text, (number, row)


def test_the_extraction_target_holds_in_the_committed_run():
    """steerlab at least 2x the fastest peer, one layer and all layers (issue #23)."""
    _, result = report.latest("extraction")
    assert result["pairs"] >= 64
    for label in ("one layer", "all layers"):
        rows = result[label]["pairs_per_s"]
        peers = [v for k, v in rows.items() if k not in ("steerlab",) and not k.startswith("naive")]
        assert rows["steerlab"] >= 2 * max(peers), (label, rows)
        counts = {len(t) for t in result[label]["seconds"].values()}
        assert counts == {result["rounds"]}  # every tool timed the same number of times


def test_a_result_is_refused_when_the_machine_was_busy(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.delenv("BENCH_ALLOW_BUSY", raising=False)
    quiet = common.Quiet("demo")
    monkeypatch.setattr(
        quiet, "record", lambda: {"other_processes_cpu_share": 0.5, "alone": False,
                                  "peak_load_average": 3.0, "seconds": 1.0}
    )  # fmt: skip
    with pytest.raises(SystemExit, match="not written"):
        common.write_result("demo", {"x": 1}, quiet)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("BENCH_ALLOW_BUSY", "1")
    quiet.allow = True
    path = common.write_result("demo", {"x": 1}, quiet)
    assert json.loads(path.read_text())["machine_load"]["alone"] is False


def test_a_section_refuses_to_start_beside_a_busy_process(monkeypatch):
    import subprocess
    import time

    monkeypatch.delenv("BENCH_ALLOW_BUSY", raising=False)
    # A busy loop outside this process's tree (its parent shell exits at once).
    pidfile = Path("/tmp") / f"steerlab-busy-{time.monotonic_ns()}"
    subprocess.run(
        ["sh", "-c", f"{sys.executable} -c 'while True: pass' & echo $! > {pidfile}"], check=True
    )
    pid = int(pidfile.read_text())
    try:
        with pytest.raises(SystemExit, match="benchmark demo alone"), common.Quiet("demo"):
            pass
    finally:
        import os
        import signal

        os.kill(pid, signal.SIGKILL)
        pidfile.unlink()
