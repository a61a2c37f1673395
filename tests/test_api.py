"""The public face: names, docstrings, exception hierarchy, typing."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastshm
from fastshm import errors

PUBLIC = ["Segment", "Address", "Publisher", "Subscriber", "Message", "FastShmError",
          "ProtocolError", "Full"]


def test_the_issue_names_import_from_the_package():
    for name in PUBLIC:
        assert name in fastshm.__all__
        assert getattr(fastshm, name) is not None


def test_every_public_name_has_a_docstring():
    for name in fastshm.__all__:
        obj = getattr(fastshm, name)
        if name.startswith("__"):
            continue
        assert inspect.getdoc(obj), f"{name} has no docstring"
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member) and not isinstance(member, property):
                    continue
                assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_exceptions_share_a_base_and_are_builtins_too():
    assert issubclass(fastshm.ProtocolError, fastshm.FastShmError)
    assert issubclass(fastshm.ProtocolError, ValueError)
    assert issubclass(fastshm.Full, TimeoutError)
    assert issubclass(fastshm.Disconnected, ConnectionError)
    assert issubclass(fastshm.GenerationError, LookupError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), fastshm.FastShmError)


def test_package_ships_typing_markers():
    pkg = Path(fastshm.__file__).parent
    assert (pkg / "py.typed").exists()
    assert (pkg / "_core.pyi").exists()


@pytest.mark.skipif(shutil.which("mypy") is None and not any(
    Path(p, "mypy").exists() for p in sys.path), reason="mypy is a test extra")
def test_mypy_strict_passes_on_the_package():
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        pytest.skip("not running from a source checkout")
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                          str(root / "pyproject.toml"), str(root / "src" / "fastshm")],
                         capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
