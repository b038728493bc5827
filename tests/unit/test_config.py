from pathlib import Path

import pytest
import yaml
from flywheel.config import Settings
from flywheel.paths import home


def test_defaults_run_locally(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for key in [k for k in __import__("os").environ if k.startswith("FLYWHEEL_")]:
        monkeypatch.delenv(key)
    s = Settings()
    assert (s.kafka_bootstrap, s.clickhouse_url, s.http_port) == ("127.0.0.1:9092", None, 8088)
    assert s.write_key_set == {"flywheel-dev-key"}
    assert s.topics.raw == "events.raw"


def test_env_overrides_the_config_file_which_overrides_defaults(monkeypatch, tmp_path):
    config = tmp_path / "flywheel.yaml"
    config.write_text("http_port: 9999\npartitions: 3\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(config))
    monkeypatch.setenv("FLYWHEEL_HTTP_PORT", "7777")
    monkeypatch.setenv("FLYWHEEL_TOPIC_RAW", "my.raw")
    s = Settings()
    assert (s.http_port, s.partitions, s.topics.raw) == (7777, 3, "my.raw")


def test_docker_compose_uses_only_real_setting_names():
    compose = yaml.safe_load((home() / "docker-compose.yml").read_text())
    known = {f"FLYWHEEL_{f.upper()}" for f in Settings.model_fields}
    for service in ("worker", "ui"):
        names = set(compose["services"][service]["environment"])
        assert names <= known, (service, names - known)
    assert compose["services"]["ui"]["command"] == ["ui"]


def test_a_named_config_file_that_does_not_exist_is_an_error(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "nope.yaml"))
    try:
        Settings()
    except FileNotFoundError as exc:
        assert "FLYWHEEL_CONFIG" in str(exc)
    else:
        raise AssertionError("a missing FLYWHEEL_CONFIG file must be an error")


def test_every_setting_is_documented_in_the_readme():
    readme = (home() / "README.md").read_text()
    missing = [f for f in Settings.model_fields if f != "topics" and f"`FLYWHEEL_{f.upper()}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_as_env_round_trips(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    original = Settings(http_port=1234, partitions=3, clickhouse_url="clickhouse://h:9000/default")
    for key, value in original.as_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


def test_the_log_format_is_text_or_json(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="text or json"):
        Settings()
