"""`stream-rec snapshots verify` and `diff` over versions written with quantized vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stream_rec import cli
from stream_rec.model import delta_from_state
from stream_rec.model import tables as T
from stream_rec.snapshot import SnapshotStore
from tests.support import trained_state


def _cli(argv: list[str], store: Path, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    monkeypatch.setenv("STREAM_REC_STORE__PATH", str(store))
    capsys.readouterr()
    rc = cli.main(argv)
    return rc, json.loads(capsys.readouterr().out)


def test_verify_accepts_quantized_versions_and_refuses_a_flipped_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    old, new = trained_state(300), trained_state(600)
    full = SnapshotStore(root, vector_dtype="int8").publish(old, offsets={}, watermark=1)
    delta = delta_from_state(new, np.arange(len(new.user_ids)), np.arange(len(new.item_ids)))
    # a writer restarted under another store.vector_dtype continues the chain
    m2 = SnapshotStore(root, vector_dtype="float16").publish_delta(
        delta, parent=full, offsets={}, watermark=2)
    assert (full.format, m2.format) == (3, 3)
    rc, out = _cli(["snapshots", "verify", "--json"], root, monkeypatch, capsys)
    assert rc == 0 and [r["ok"] for r in out["results"]] == [True, True], out
    rc, diff = _cli(["snapshots", "diff", "1", "2", "--json"], root, monkeypatch, capsys)
    assert rc == 0 and diff["items_added"] == len(new.item_ids) - len(old.item_ids)

    # one int8 code of v1's item.vectors flipped: the checksum refuses v1 and the chain on it
    store = SnapshotStore(root)
    manifest = store.read_manifest(1)
    where = manifest.entries[f"{T.ITEM_VECTORS}.npy"]
    path = Path(store.version_dir(1)) / manifest.data_file
    raw = bytearray(path.read_bytes())
    raw[int(where["offset"]) + int(where["bytes"]) - 1] ^= 0x40
    path.write_bytes(bytes(raw))
    rc, out = _cli(["snapshots", "verify", "--json"], root, monkeypatch, capsys)
    assert rc == 1 and [r["ok"] for r in out["results"]] == [False, False], out
    assert "checksum" in out["results"][0]["error"]
