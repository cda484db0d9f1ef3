from __future__ import annotations

from pathlib import Path

import pytest

from pacs_agent.config import ConfigError, effective_settings, load_settings, mask_url


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("PACS_AGENT_"):
            monkeypatch.delenv(key)


def test_defaults_are_embedded_and_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.listener.ae_title == "PACSAGENT" and s.listener.port == 11112
    assert s.listener.host == "127.0.0.1"
    assert s.data_dir == tmp_path / "var"
    assert s.database_url == f"sqlite:///{tmp_path / 'var' / 'pacs-agent.db'}"
    assert s.broker_url is None


def test_toml_file_and_environment_with_environment_winning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'data_dir = "/srv/pacs-agent"\n[listener]\nport = 104\nae_title = "AIHOSP"\n'
        '[[export.destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.5"\n'
        "port = 104\n"
    )
    monkeypatch.setenv("PACS_AGENT_CONFIG", str(cfg))
    monkeypatch.setenv("PACS_AGENT_LISTENER__PORT", "11113")
    s = load_settings()
    assert s.listener.port == 11113
    assert s.listener.ae_title == "AIHOSP"
    assert s.data_dir == Path("/srv/pacs-agent")
    assert s.export.destinations[0].host == "10.0.0.5"


def test_invalid_values_say_what_and_where(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[listener]\nae_title = "THIS AE TITLE IS FAR TOO LONG"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml(.|\n)*ae_title"):
        load_settings(cfg)


def test_unknown_setting_is_an_error_not_ignored(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.toml"
    cfg.write_text("[listener]\nprot = 104\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(cfg)


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_secrets_are_masked_in_effective_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_AGENT_DATABASE__URL", "postgresql+psycopg://agent:s3cret@db/pacs")
    monkeypatch.setenv("PACS_AGENT_BROKER__URL", "redis://:hunter2@cache:6379/0")
    shown = str(effective_settings(load_settings()))
    assert "s3cret" not in shown and "hunter2" not in shown
    assert "postgresql+psycopg://agent:***@db/pacs" in shown
    assert mask_url("amqp://guest:guest@h//") == "amqp://guest:***@h//"


def test_invalid_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_AGENT_WORKER__DEVICE", "gpu0")
    with pytest.raises(ConfigError, match="device"):
        load_settings()


def test_two_notifiers_of_one_name_are_refused_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "notify.toml"
    hook = '[[notify.notifiers]]\nkind = "webhook"\nname = "ris"\nurl = "http://127.0.0.1:9/h"\n'
    cfg.write_text((hook + 'secret = "0123456789abcdef"\n') * 2)
    with pytest.raises(ConfigError, match=r"notifier names must be unique: \['ris'\]"):
        load_settings(cfg)
