"""Starting a gang: what a rank is passed, when a process is a rank, bad sizes refused."""

from __future__ import annotations

import pytest

from stream_rec.cli import main
from stream_rec.worker.launch import in_gang, rank_argv
from stream_rec.worker.source import gang_partitions


def test_ranks_get_the_launcher_arguments_less_procs() -> None:
    assert rank_argv(["worker", "--procs", "2", "--store", "s"]) == ["worker", "--store", "s"]
    assert rank_argv(["worker", "--procs=4", "--group", "g"]) == ["worker", "--group", "g"]


def test_a_process_is_a_rank_only_under_the_elastic_agent(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not in_gang()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert in_gang()


def test_partitions_are_dealt_by_rank_modulo_the_gang_size() -> None:
    parts = range(10)
    dealt = [gang_partitions(parts, r, 3) for r in range(3)]
    assert dealt == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert gang_partitions(range(2), 2, 3) == []       # more ranks than partitions: idle


def test_a_gang_needs_at_least_one_rank(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--procs", "0"]) == 2
    assert "--procs" in capsys.readouterr().err


def test_a_gang_refuses_item_text_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The ranks read no items topic and exchange no gradient of W: refused before launch."""
    monkeypatch.setenv("STREAM_REC_MODEL__CONTENT_DIM", "16")
    assert main(["worker", "--procs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trains no item text" in err, err
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")     # a rank under torchrun: the same
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["worker"]) == 2
    assert "trains no item text" in capsys.readouterr().err
    assert main(["eval", "--ranks", "2", "--items"]) == 2
    assert "--items" in capsys.readouterr().err
