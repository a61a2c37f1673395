"""Build of fastshm's compiled core (``fastshm._core``) with Cython.

Everything else about the package is declared in ``pyproject.toml``.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDES = os.path.join("src", "fastshm", "includes")

extra_compile_args = ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
if os.environ.get("FASTSHM_WERROR"):
    extra_compile_args.append("-Werror")

core = Extension(
    "fastshm._core",
    sources=[os.path.join("src", "fastshm", "_core.pyx")],
    include_dirs=[INCLUDES],
    extra_compile_args=extra_compile_args,
)

setup(
    ext_modules=cythonize(
        [core],
        include_path=["src"],
        compiler_directives={"language_level": "3", "embedsignature": True},
        annotate=bool(os.environ.get("FASTSHM_ANNOTATE")),
    ),
)
