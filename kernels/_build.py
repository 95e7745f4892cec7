"""Building the C++ library of `kernels/csrc` (one shared object, `torch.ops.prefixgate_cpu`).

The library is compiled on first use (`build`, called by `kernels.cpu_attention.load_kernel`;
~20 s on 2 cores) with `torch.utils.cpp_extension` into `<cache_dir>/torch_extensions` (cache_dir:
`kernels.options`, from PREFIXGATE_CACHE_DIR; default ~/.cache/prefixgate), in a folder keyed by
the sources, the compiler flags, torch, Python and the CPU, under a file lock so that concurrent
processes build it once. Flag sets are tried in order (`FLAG_SETS`): the host's vector units
first, portable code if the compiler refuses. See `csrc/README.md` for what each source holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import platform
import sys
import warnings
from pathlib import Path

import torch

from kernels.options import cache_root, options

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))  # all in one library
HEADERS = sorted(CSRC.glob("*.h"))
NAME = "prefixgate_cpu_attention"
# Tried in order: the host's vector units first, portable code if the compiler refuses.
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"])


def build() -> None:
    """Build (or reuse) and load the library with the first flag set that compiles; raises
    RuntimeError with every set's error when none does."""
    errors = []
    for flags in FLAG_SETS:
        try:
            _compile(flags)
        except Exception as exc:
            errors.append(f"{' '.join(flags)}: {exc}")
            continue
        return
    raise RuntimeError("; ".join(errors))


def _cache_root() -> Path:
    return cache_root(options().cache_dir) / "torch_extensions"


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in info if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _build_dir(flags: list[str]) -> Path:
    key = hashlib.sha256()
    for source in SOURCES + HEADERS:
        key.update(source.name.encode() + b"\0" + source.read_bytes())
    for part in (" ".join(flags), torch.__version__, sys.version, platform.machine(), _cpu_id()):
        key.update(b"\0" + part.encode())
    return _cache_root() / f"cpu_attention-{key.hexdigest()[:16]}"


def _compile(flags: list[str]) -> None:
    """Build (or reuse) and load the library; loading registers `torch.ops.prefixgate_cpu`."""
    build_dir = _build_dir(flags)
    build_dir.mkdir(parents=True, exist_ok=True)
    library, done = build_dir / f"{NAME}.so", build_dir / "built"
    with open(build_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS even if this process dies
        if not done.exists():
            _run_build(flags, build_dir)
            done.touch()
    torch.ops.load_library(str(library))


def _run_build(flags: list[str], build_dir: Path) -> None:
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()
    # torch's own lock file is a plain file: one left by a killed build would block forever
    (build_dir / "lock").unlink(missing_ok=True)
    with warnings.catch_warnings():  # compiler-version notes are not our users' problem
        warnings.simplefilter("ignore")
        cpp_extension.load(
            name=NAME,
            sources=[str(source) for source in SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
