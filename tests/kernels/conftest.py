"""Fixtures of the kernel tests."""

from __future__ import annotations

import shutil

import pytest

from kernels import cpu_attention


@pytest.fixture(scope="module")
def kernel() -> cpu_attention.Kernel:
    """The C++ CPU library, built (or reused) once; the test is skipped without a compiler."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the CPU kernels can't be built here")
    op = cpu_attention.load_kernel()
    assert op is not None, "the CPU kernels failed to build (see the logged warning)"
    return op
