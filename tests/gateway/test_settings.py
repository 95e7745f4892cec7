"""Settings from the environment, and what they build."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import DEFAULT_URL, AdminClientSettings, Settings, markdown


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.host, s.port, s.model, s.model_name()) == ("127.0.0.1", 8000, None, "smollm2")
    assert s.redis_url is None and s.admin_key is None
    config = s.engine_config()
    assert config.model is None and config.cache.num_blocks is None
    assert config.compute_nice == 5


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIXGATE_MODEL", "/models/Qwen2-0.5B/")
    monkeypatch.setenv("PREFIXGATE_PORT", "9000")
    monkeypatch.setenv("PREFIXGATE_NUM_BLOCKS", "128")
    monkeypatch.setenv("PREFIXGATE_MAX_QUEUE", "7")
    monkeypatch.setenv("PREFIXGATE_COMPUTE_NICE", "0")
    monkeypatch.setenv("PREFIXGATE_ADMIN_KEY", "secret")
    s = Settings()
    assert s.port == 9000 and s.model_name() == "Qwen2-0.5B"
    assert s.admin_key is not None and s.admin_key.get_secret_value() == "secret"
    assert "secret" not in repr(s)
    config = s.engine_config()
    assert config.model == "/models/Qwen2-0.5B/"
    assert config.cache.num_blocks == 128 and config.scheduler.max_waiting == 7
    assert config.compute_nice == 0
    monkeypatch.setenv("PREFIXGATE_SERVED_MODEL_NAME", "qwen")
    assert Settings().model_name() == "qwen"


def test_invalid_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIXGATE_PORT", "-1")
    with pytest.raises(ValueError, match="port"):
        Settings()


def test_tenant_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.redis_failure_mode, s.lease_ttl_s, s.redis_timeout_s) == ("closed", 300.0, 0.5)
    assert s.anonymous
    monkeypatch.setenv("PREFIXGATE_REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("PREFIXGATE_REDIS_FAILURE_MODE", "OPEN")
    monkeypatch.setenv("PREFIXGATE_LEASE_TTL_S", "45")
    monkeypatch.setenv("PREFIXGATE_REDIS_TIMEOUT_S", "0.25")
    monkeypatch.setenv("PREFIXGATE_REDIS_KEY_PREFIX", "staging")
    s = Settings()
    assert s.tenants_config().key_prefix == "staging"
    assert not s.anonymous
    config = s.tenants_config()
    assert (config.redis_url, config.failure_mode.value, config.lease_ttl_s) == (
        "redis://cache:6379/2", "open", 45.0,
    )  # fmt: skip
    assert (config.socket_timeout_s, config.op_timeout_s) == (0.25, 1.0)
    monkeypatch.setenv("PREFIXGATE_REDIS_URL", "")  # empty means unset
    monkeypatch.setenv("PREFIXGATE_ADMIN_KEY", "")
    assert Settings().anonymous
    monkeypatch.setenv("PREFIXGATE_ADMIN_KEY", "secret")
    s = Settings()
    assert not s.anonymous and s.tenants_config().admin_key == "secret"
    assert s.tenants_config().embedded


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PREFIXGATE_REDIS_FAILURE_MODE", "maybe"),
        ("PREFIXGATE_LEASE_TTL_S", "0"),
        ("PREFIXGATE_REDIS_KEY_PREFIX", "a:{b}"),
    ],
)
def test_invalid_tenant_settings(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name.removeprefix("PREFIXGATE_").lower()):
        Settings()


def test_invalid_engine_settings_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values Settings accepts but the engine's config refuses still name the field."""
    monkeypatch.setenv("PREFIXGATE_BLOCK_SIZE", "12")
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        Settings().engine_config()


def test_admin_client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    client = AdminClientSettings()
    assert (client.url, client.admin_key_value()) == (DEFAULT_URL, None)
    monkeypatch.setenv("PREFIXGATE_URL", "http://gw:9000")
    monkeypatch.setenv("PREFIXGATE_ADMIN_KEY", "secret")
    client = AdminClientSettings()
    assert (client.url, client.admin_key_value()) == ("http://gw:9000", "secret")
    assert "secret" not in repr(client)
    monkeypatch.setenv("PREFIXGATE_ADMIN_KEY", "")
    assert AdminClientSettings().admin_key is None


def test_configuration_docs_are_current() -> None:
    """docs/configuration.md is generated from the Settings declarations: regenerate it with
    `python -m gateway.settings --markdown > docs/configuration.md` after changing them."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert docs.read_text() == markdown()


def test_configuration_docs_list_every_variable_and_flag() -> None:
    text = markdown()
    for name in (*Settings.model_fields, *AdminClientSettings.model_fields):
        assert f"`PREFIXGATE_{name.upper()}`" in text
    assert "| `PREFIXGATE_NUM_BLOCKS` | `--num-blocks` | unset |" in text
    assert "| `PREFIXGATE_PORT` | `--port` | `8000` |" in text
    assert "| `PREFIXGATE_REDIS_URL` |  | unset |" in text  # no flag: environment only
