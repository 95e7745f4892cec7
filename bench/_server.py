"""Server processes the benchmarks start: waiting for `/ready`."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 300.0
) -> None:
    """Return once `url/ready` answers 200; raise (and kill `proc`) if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited ({proc.returncode}); log: {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s; log: {log}")
