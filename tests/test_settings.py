"""Settings: file, environment and flags, in that order of strength; secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_rec.cli import main
from stream_rec.settings import load_settings


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


def test_kafka_edge_settings_reach_the_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("STREAM_REC_KAFKA__COMPRESSION_TYPE", "zstd")
    monkeypatch.setenv("STREAM_REC_WORKER__ON_OFFSET_OUT_OF_RANGE", "earliest")
    s = load_settings()
    assert (s.kafka.compression_type, s.worker.on_offset_out_of_range) == ("zstd", "earliest")
    assert s.kafka.max_request_size == 1_048_576  # Kafka's own default
    monkeypatch.setenv("STREAM_REC_KAFKA__COMPRESSION_TYPE", "brotli")
    with pytest.raises(ValidationError, match="compression_type"):
        load_settings()
    monkeypatch.setenv("STREAM_REC_KAFKA__COMPRESSION_TYPE", "lz4")
    monkeypatch.setenv("STREAM_REC_WORKER__ON_OFFSET_OUT_OF_RANGE", "skip")
    with pytest.raises(ValidationError, match="on_offset_out_of_range"):
        load_settings()
