"""The ``fastshm bench`` report, on the committed results of a real run (no benchmark runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastshm import bench

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "2core-vm.json"

pytestmark = pytest.mark.skipif(not RESULTS.is_file(), reason="no committed benchmark results")


def test_load_reads_every_benchmark_with_its_metadata() -> None:
    results, machine = bench.load(str(RESULTS))
    assert results
    systems = {r.system for r in results}
    assert {"fastshm-tcp", "fastshm-unix", "tcp", "unix", "memcpy"} <= systems
    assert machine["fastshm_bench"]["cpu_count"] >= 1
    stream = next(r for r in results if r.kind == "stream")
    assert stream.per_message < stream.median  # a streaming round holds many messages


def test_report_has_medians_ratios_and_targets() -> None:
    results, machine = bench.load(str(RESULTS))
    text = bench.report(results, machine)
    assert "Latency, one way (RTT/2)" in text
    assert "fastshm-tcp speed-up over each" in text
    assert "Streaming, consumer touches each" in text
    assert "Targets (benchmark issue):" in text
    lines = bench.targets(results)
    assert lines and all(line.split()[0] in ("MET", "MISSED", "(info)") for line in lines)


def test_cli_reports_a_json_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fastshm.__main__ import main

    png = tmp_path / "chart.png"
    assert main(["bench", "--from-json", str(RESULTS), "--out", str(tmp_path),
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "limit-unix" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "chart: skipped" in out
    else:
        assert png.stat().st_size > 10_000


def test_size_labels() -> None:
    assert bench.size_label(64) == "64 B"
    assert bench.size_label(4096) == "4 KiB"
    assert bench.size_label(1 << 20) == "1 MiB"
    assert bench.size_label(6_220_800) == "6.2 MB"
