"""The soak (`bench/soak.py`) made small for CI: two engine replicas of the tiny model and two
gateways on a throwaway Redis, 40 streaming clients of three tenants with tight quotas for 20 s,
random disconnects and aborts, prefixes used by reference, 3 s concurrency leases (renewed
every second, many times per stream); then every exact end-state check of the soak: only
200/429/503 with OpenAI's error body, every KV block free but the pins, every lease released,
each tenant's usage in Redis equal to the tokens its requests were charged.
No timing or throughput is asserted (memory is sampled and printed, not checked: 20 s has no
steady state)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def load_soak() -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module("soak")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_soak(tiny_model_dir: str, tmp_path: Path) -> None:
    soak = load_soak()
    config = soak.SoakConfig(
        clients=40, duration_s=20.0, gateways=2, replicas=2, model=tiny_model_dir,
        dtype="float32", num_blocks=256, max_model_len=512, max_tokens=24, sample_s=1.0,
        lease_ttl_s=3.0, check_rss=False, log_dir=tmp_path,
    )  # fmt: skip
    result = soak.run(config)
    print(soak.summary(result))
    assert not result.failures, soak.summary(result)
    # The run exercised what it checks: refusals, completions, disconnects, aborts and pins.
    outcomes = result.figures["by_outcome"]
    assert outcomes.get("complete", 0) > 0 and outcomes.get("refused", 0) > 0
    assert outcomes.get("disconnected", 0) + outcomes.get("aborted", 0) > 0
    assert result.figures["by_status"].get("429", 0) > 0
    assert sum(kv["num_pinned_blocks"] for kv in result.figures["kv"].values()) > 0
