"""The main job: `python -m fastshm demo` over tcp and unix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_demo_reports_no_errors_and_no_segments_left(transport):
    out = subprocess.run(
        [sys.executable, "-m", "fastshm", "demo", "--transport", transport, "--seconds", "1",
         "--json"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["errors"] == 0
    assert summary["segments_left"] == []
    assert summary["frames_received"] == summary["frames_sent"] > 10
    assert summary["frame_bytes"] == 6220800
    assert summary["route"].startswith(transport)


def test_demo_human_summary_with_a_fixed_count():
    out = subprocess.run(
        [sys.executable, "-m", "fastshm", "demo", "--count", "50", "--size", "1000"],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stdout + out.stderr
    for word in ("50 sent, 50 received", "frames/s", "GB/s", "p99", "errors         0",
                 "segments left  0"):
        assert word in out.stdout
