"""The local-directory store: what only a real filesystem can get wrong.

The promises every backend keeps are checked in ``tests/contracts/test_store.py``;
these are the local specifics: symlinks and absolute paths out of the store.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stream_rec.snapshot import SnapshotStore
from tests.contracts.test_store import check_refused_and_previous_kept


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "store", keep_versions=3)


def _corrupt(store: SnapshotStore, how: str) -> None:
    vdir = Path(store.version_dir(2))
    name = store.read_manifest(2).data_file
    victim = vdir / name
    if how == "absolute":
        manifest = (vdir / "manifest.json").read_text()
        (vdir / "manifest.json").write_text(manifest.replace(f'"{name}"', '"/etc/passwd"'))
    elif how == "symlink":
        outside = Path(store.root).parent / "outside.npy"
        outside.write_bytes(victim.read_bytes())
        victim.unlink()
        os.symlink(outside, victim)


@pytest.mark.parametrize("how", ["absolute", "symlink"])
def test_paths_out_of_the_store_are_refused(store: SnapshotStore, how: str) -> None:
    check_refused_and_previous_kept(store, lambda s: _corrupt(s, how))
