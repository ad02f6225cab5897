"""A hostile snapshot store: the worker restores the newest valid version, never the hostile one.

Each case leaves a valid v1 and makes v2 hostile (a manifest naming ``../`` or
absolute paths, a version directory or manifest symlinked out of the store, no
manifest, a delta whose parent is hostile, a LATEST pointer that is not a
number), with ``LATEST`` pointing at it. The reader must refuse v2, and a
worker restoring from the store must fall back to v1, its offsets and its
counts, and publish its next version over v1.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stream_rec.model import delta_from_state
from stream_rec.settings import Settings
from stream_rec.snapshot import CorruptSnapshot, SnapshotStore
from stream_rec.worker import Worker
from tests.support import trained_state

pytestmark = [pytest.mark.faults]

CASES = ["manifest-dotdot", "manifest-absolute", "entry-dotdot", "symlinked-version-dir",
         "symlinked-manifest", "no-manifest", "delta-over-hostile", "latest-garbage"]


def _make_hostile(store: SnapshotStore, how: str, outside: Path) -> None:
    root = Path(store.root)
    v2 = root / "versions" / "v000000000002"
    manifest = v2 / "manifest.json"
    data = f'"{store.read_manifest(2).data_file}"'
    if how == "manifest-dotdot":
        manifest.write_text(manifest.read_text().replace(data, '"../../../data.bin"'))
    elif how == "manifest-absolute":
        manifest.write_text(manifest.read_text().replace(data, '"/etc/passwd"'))
    elif how == "entry-dotdot":
        manifest.write_text(manifest.read_text().replace('"user_ids.json"', '"../user_ids.json"'))
    elif how == "symlinked-version-dir":
        # A complete, checksummed version living outside the store, linked in.
        shutil.move(str(v2), outside / "v2")
        os.symlink(outside / "v2", v2)
    elif how == "symlinked-manifest":
        shutil.copy(manifest, outside / "manifest.json")
        manifest.unlink()
        os.symlink(outside / "manifest.json", manifest)
    elif how == "no-manifest":
        manifest.unlink()
    elif how == "delta-over-hostile":
        snap = store.load(2)
        assert snap is not None
        delta = delta_from_state(snap.state, None, None)
        store.publish_delta(delta, parent=snap.manifest, offsets={"clicks": {0: 300}},
                            watermark=3, events=1)
        manifest.unlink()
    elif how == "latest-garbage":
        (root / "LATEST").write_text("../../etc/passwd")
        (v2 / data.strip('"')).write_bytes(b"\0" * 16)
        return
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize("how", CASES)
def test_worker_restores_the_newest_valid_version(how: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = SnapshotStore(tmp_path / "store", keep_versions=10)
    state = trained_state(200)
    v1 = store.publish(state, offsets={"clicks": {0: 100, 1: 7}}, watermark=1)
    store.publish(state, offsets={"clicks": {0: 200, 1: 9}}, watermark=2, parent=1)
    _make_hostile(store, how, outside)
    if how != "latest-garbage":
        with pytest.raises(CorruptSnapshot):
            store.load(store.latest_version())

    settings = Settings()
    settings.store.path = str(tmp_path / "store")
    settings.kafka.topic = "clicks"
    settings.worker.device = "cpu"
    settings.model.dim, settings.model.train_chunk = 16, 100  # as trained_state() was built
    worker = Worker(settings, store=SnapshotStore(tmp_path / "store", keep_versions=10))
    model = worker.restore()
    assert worker.version == 1
    assert worker.offsets == {0: 100, 1: 7}
    assert worker.checkpoint.restored is not None
    assert worker.checkpoint.restored.version == v1.version
    assert model.n_users == len(state.user_ids)
    # Nothing outside the store was touched.
    assert all(p.is_file() or p.is_dir() for p in outside.iterdir())
