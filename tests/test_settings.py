"""Settings: file, environment and flags, in that order of strength; secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_rec.cli import main
from stream_rec.settings import SettingsError, load_settings


def test_env_overrides_file_and_flags_override_env(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kafka]\ntopic = "from-file"\nbootstrap = "file:1"\n[model]\ndim = 32\n')
    monkeypatch.setenv("STREAM_REC_CONFIG", str(cfg))
    monkeypatch.setenv("STREAM_REC_KAFKA__BOOTSTRAP", "env:2")
    s = load_settings(**{"kafka.topic": None})
    assert (s.kafka.topic, s.kafka.bootstrap, s.model.dim) == ("from-file", "env:2", 32)
    s = load_settings(**{"kafka.bootstrap": "flag:3"})
    assert s.kafka.bootstrap == "flag:3" and s.kafka.topic == "from-file"


def test_config_command_masks_secrets(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STREAM_REC_KAFKA__SASL_PASSWORD", "hunter2")
    assert main(["config", "--topic", "t1"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "**********" in out and '"topic": "t1"' in out


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STREAM_REC_CONFIG", "/nonexistent.toml")
    assert main(["config"]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_unreachable_broker_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_timeout = "STREAM_REC_KAFKA__BOOTSTRAP_TIMEOUT_MS"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(env_timeout, "1500")
        code = main(["produce", "--dataset", "synthetic", "--limit", "1",
                     "--bootstrap", f"127.0.0.1:{port}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no Kafka broker answers" in err and "Traceback" not in err


@pytest.mark.parametrize("where, name", [
    ("env", "STREAM_REC_KAFKA__BOOTSTRP"),   # a typo inside a section
    ("env", "STREAM_REC_KAFKAA__TOPIC"),     # a section that does not exist
    ("file", "kafka.topik"),
])
def test_an_unknown_setting_is_an_error_naming_it(where: str, name: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    if where == "env":
        monkeypatch.setenv(name, "x")
        shown = name
    else:
        section, key = name.split(".")
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[{section}]\n{key} = "x"\n')
        monkeypatch.setenv("STREAM_REC_CONFIG", str(cfg))
        shown = f"'{name}'"
    assert main(["config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown setting" in err and shown in err, err


@pytest.mark.parametrize("argv", [["config", "--log-level", "foo"], ["config", "--no-such"],
                                  ["worker", "--device"]])
def test_argument_errors_are_one_line(argv: list[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err


def test_log_level_is_case_insensitive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--log-level", "debug"]) == 0


def test_kafka_edge_settings_reach_the_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_REC_KAFKA__COMPRESSION_TYPE", "zstd")
    monkeypatch.setenv("STREAM_REC_WORKER__ON_OFFSET_OUT_OF_RANGE", "earliest")
    s = load_settings()
    assert (s.kafka.compression_type, s.worker.on_offset_out_of_range) == ("zstd", "earliest")
    assert s.kafka.max_request_size == 1_048_576  # Kafka's own default
    monkeypatch.setenv("STREAM_REC_KAFKA__COMPRESSION_TYPE", "brotli")
    with pytest.raises(SettingsError, match="compression_type"):
        load_settings()
    monkeypatch.setenv("STREAM_REC_KAFKA__COMPRESSION_TYPE", "lz4")
    monkeypatch.setenv("STREAM_REC_WORKER__ON_OFFSET_OUT_OF_RANGE", "skip")
    with pytest.raises(SettingsError, match="on_offset_out_of_range"):
        load_settings()
