"""docker-compose.yml, run without Docker: each service's command as a local process with the
file's environment (service host names mapped to loopback, every port to a free one, volumes to
local directories), two engine replicas, then requests through the gateway. So the file cannot
drift from the code. Where a `docker` binary exists, `docker compose config` validates it too.

The test's own overrides (not the file's): the tiny test model instead of the bundled one, and
the example env file when `prefixgate.env` does not exist.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from gateway.settings import Settings
from kernels.options import cache_root
from tests.gateway.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` from this process's environment."""
    return _VARIABLE.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_files(service: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in service.get("env_file", []):
        path = ROOT / (entry["path"] if isinstance(entry, dict) else entry)
        if not path.exists():
            path = path.with_name(path.name + ".example")
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, value = line.partition("=")
                out[name.strip()] = value.strip()
    return out


class Local:
    """Runs compose services as processes: `service:port` becomes `127.0.0.1:<free port>`."""

    def __init__(self, spec: dict[str, Any], tmp: Path) -> None:
        self.spec = spec
        self.tmp = tmp
        self.ports: dict[tuple[str, int], int] = {}  # (service, its port) -> local port
        self.volumes = {"model-cache": str(cache_root(None)), "redis-data": str(tmp / "redis")}

    def local_port(self, service: str, port: int) -> int:
        return self.ports.setdefault((service, port), free_port())

    def map_hosts(self, value: str) -> str:
        services = "|".join(map(re.escape, self.spec["services"]))
        pattern = re.compile(rf"\b({services}):(\d+)")
        return pattern.sub(lambda m: f"127.0.0.1:{self.local_port(m[1], int(m[2]))}", value)

    def command(self, name: str, instance: str) -> tuple[list[str], int]:
        """The service's argv with its `--port` moved to a free one, and that port."""
        argv = shlex.split(interpolate(self.spec["services"][name]["command"]))
        i = argv.index("--port")
        port = self.local_port(name if instance == name else instance, int(argv[i + 1]))
        argv[i + 1] = str(port)
        if argv[0] == "prefixgate":
            argv[0] = str(BIN / "prefixgate")
        return argv, port

    def environment(self, name: str, overrides: dict[str, str]) -> dict[str, str]:
        service = self.spec["services"][name]
        env = {k: interpolate(str(v)) for k, v in (service.get("environment") or {}).items()}
        env = {k: self.map_hosts(v) for k, v in (env | env_files(service)).items()}
        for mount in service.get("volumes", []):
            volume, _, target = mount.partition(":")
            env = {k: v.replace(target, self.volumes[volume]) for k, v in env.items()}
        return (
            {k: v for k, v in os.environ.items() if not k.startswith("PREFIXGATE_")}
            | env
            | overrides
        )

    @contextmanager
    def run(self, name: str, instance: str, overrides: dict[str, str]) -> Iterator[int]:
        argv, port = self.command(name, instance)
        if argv[0] == "redis-server":
            argv[0] = shutil.which("redis-server") or str(BIN / "redis-server")
            Path(self.volumes["redis-data"]).mkdir(exist_ok=True)
            argv += ["--dir", self.volumes["redis-data"], "--bind", "127.0.0.1"]
        proc = subprocess.Popen(argv, env=self.environment(name, overrides), cwd=self.tmp)
        try:
            yield port
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def redis_up(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def test_compose_file_shape() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert set(services) == {"redis", "engine", "gateway"}
    assert "--appendonly yes" in services["redis"]["command"]
    for name in ("engine", "gateway"):
        assert "/ready" in " ".join(services[name]["healthcheck"]["test"])
        # Docker's SIGKILL comes after the drain (gateway/drain.py), not during it.
        grace_s = float(services[name]["stop_grace_period"].removesuffix("s"))
        assert grace_s > Settings.model_fields["drain_timeout_s"].default
    assert "PREFIXGATE_ADMIN_KEY" not in str(services["gateway"].get("environment"))
    assert "PREFIXGATE_ADMIN_KEY" not in (ROOT / "Dockerfile").read_text()
    assert "TORCH_VARIANT" in (ROOT / "Dockerfile").read_text()


def compose_binary() -> list[str] | None:
    """`docker compose` or `docker-compose`, whichever works here (None: neither)."""
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        if subprocess.run([*argv, "version"], capture_output=True).returncode == 0:
            return argv
    return None


def test_compose_config_validates(tmp_path: Path) -> None:
    """Docker's own check of the file, where Docker Compose is installed (beside the example
    env file as `prefixgate.env`, which the file requires)."""
    compose = compose_binary()
    if compose is None:
        pytest.skip("no docker compose / docker-compose binary here")
    shutil.copy(COMPOSE, tmp_path / COMPOSE.name)
    shutil.copy(ROOT / "prefixgate.env.example", tmp_path / "prefixgate.env")
    check = subprocess.run([*compose, "-f", str(tmp_path / COMPOSE.name), "config", "-q"],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr


def test_compose_services_as_local_processes(tiny_model_dir: str, tmp_path: Path) -> None:
    local = Local(yaml.safe_load(COMPOSE.read_text()), tmp_path)
    model = {"PREFIXGATE_MODEL": tiny_model_dir, "PREFIXGATE_SERVED_MODEL_NAME": "tiny",
             "PREFIXGATE_DTYPE": "float32", "PREFIXGATE_NUM_BLOCKS": "256",
             "PREFIXGATE_LOG_LEVEL": "warning", "OMP_NUM_THREADS": "1"}  # fmt: skip
    admin_key = env_files(local.spec["services"]["gateway"])["PREFIXGATE_ADMIN_KEY"]
    admin = {"authorization": f"Bearer {admin_key}"}
    with ExitStack() as stack:
        redis_port = stack.enter_context(local.run("redis", "redis", {}))
        assert wait_until(lambda: redis_up(redis_port))
        engines = [stack.enter_context(local.run("engine", f"engine-{i}", model)) for i in (1, 2)]
        for port in engines:
            assert wait_until(lambda p=port: ready(f"http://127.0.0.1:{p}/ready"))
        gateway = stack.enter_context(local.run("gateway", "gateway", model))
        url = f"http://127.0.0.1:{gateway}"
        assert wait_until(lambda: ready(f"{url}/ready"))
        members = redis.Redis(port=redis_port).zrange("pg:replicas", 0, -1)
        assert len(members) == 2  # both replicas registered

        r = httpx.post(f"{url}/admin/tenants", headers=admin, json={"id": "acme"})
        assert r.status_code == 201, r.text
        key = httpx.post(f"{url}/admin/tenants/acme/keys", headers=admin).json()["key"]
        body = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
        headers = {"authorization": f"Bearer {key}"}
        for _ in range(2):
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 3

        # Restarted like an operator would, Redis comes back with the tenant and its key (AOF).
        redis.Redis(port=redis_port).shutdown(nosave=True)
        assert wait_until(lambda: not redis_up(redis_port))
        stack.enter_context(local.run("redis", "redis", {}))
        assert wait_until(lambda: redis_up(redis_port))
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.helpers import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("compose") / "tiny")
