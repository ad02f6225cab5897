"""What the benchmarks read from an answer: the offsets it covers, by source."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchlib import VersionOffsets, answer_offsets, covering, merged, settings_env

from stream_rec.snapshot import SnapshotStore
from tests.support import trained_state


def test_an_answer_covers_its_version_and_what_it_states(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "store"))
    m = store.publish(trained_state(200), offsets={"clicks": {0: 5, 1: 3}}, watermark=1)
    versions = VersionOffsets(store, "clicks")

    today = answer_offsets({"version": m.version, "items": []}, versions, "clicks")
    assert today == {"version": {0: 5, 1: 3}}
    assert covering(today, 0, 4) == "version"
    assert covering(today, 0, 5) is None          # offsets are the next record to apply
    assert covering(today, 2, 0) is None

    # A server following the topic states how far it got, flat or under the topic name.
    for overlay in ({"offsets": {"0": 9}}, {"offsets": {"clicks": {"0": 9}}, "events": 4}):
        body = {"version": m.version, "overlay": overlay}
        sources = answer_offsets(body, versions, "clicks")
        assert covering(sources, 0, 4) == "version"
        assert covering(sources, 0, 7) == "overlay"
        assert merged(sources) == {0: 9, 1: 3}

    # A version whose manifest is gone is unknown, not "covers nothing".
    assert answer_offsets({"version": m.version + 7}, versions, "clicks") == {}
    assert answer_offsets({"version": m.version, "overlay": {"size": 3}}, versions,
                          "clicks") == {"version": {0: 5, 1: 3}}


def test_settings_flags_become_the_environment_the_processes_read() -> None:
    assert settings_env(["worker.publish_interval_ms=5000", "serve.follow_topic=true"]) == {
        "STREAM_REC_WORKER__PUBLISH_INTERVAL_MS": "5000",
        "STREAM_REC_SERVE__FOLLOW_TOPIC": "true"}
