"""The examples run as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.skipif(not EXAMPLES.exists(), reason="not running from a source checkout")
def test_address_over_socket_example():
    out = subprocess.run([sys.executable, str(EXAMPLES / "address_over_socket.py")],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stderr
    assert "read 6220800 bytes in place" in out.stdout
