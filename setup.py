"""Build of fastshm's compiled core (``fastshm._core``) with Cython.

Everything else about the package is declared in ``pyproject.toml``.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDES = os.path.join("src", "fastshm", "includes")

extra_compile_args = ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
if os.environ.get("FASTSHM_WERROR"):
    extra_compile_args.append("-Werror")

# shm_open and shm_unlink live in librt before glibc 2.34 (Debian 11, Ubuntu
# 20.04, manylinux2014): without -lrt the core builds there but fails to
# import ("undefined symbol: shm_unlink"). On newer glibc and on musl librt is
# an empty stub that the linker drops.
libraries = ["rt"] if sys.platform.startswith("linux") else []

# Wheels built on a new glibc without a manylinux container
# (tools/build-wheels.sh sets FASTSHM_GLIBC_COMPAT=1): bind the few symbols
# newer than glibc 2.17 to their old versions, so that auditwheel can tag the
# wheel manylinux2014. includes/glibc_compat.h says which and why. The old
# shm_open is librt's, and librt.so there is only an empty librt.a, hence
# librt.so.1 by name.
extra_link_args = []
if os.environ.get("FASTSHM_GLIBC_COMPAT") == "1":
    extra_compile_args += ["-include", "glibc_compat.h"]
    extra_link_args += ["-Wl,--no-as-needed", "-l:librt.so.1", "-Wl,--as-needed"]

core = Extension(
    "fastshm._core",
    sources=[os.path.join("src", "fastshm", "_core.pyx")],
    include_dirs=[INCLUDES],
    libraries=libraries,
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

setup(
    ext_modules=cythonize(
        [core],
        include_path=["src"],
        compiler_directives={"language_level": "3", "embedsignature": True},
        annotate=bool(os.environ.get("FASTSHM_ANNOTATE")),
    ),
)
