"""API fuzzing from the server's own OpenAPI schema: no 5xx, no hang, bounded cases.

The application is the real one over a store holding a trained snapshot;
schemathesis generates path and query values (ids of any length and alphabet,
out-of-range ``k``, missing and extra parameters) for every operation.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    status_code_conformance,
)

from stream_rec.serving.app import create_app
from stream_rec.snapshot import SnapshotStore
from tests.support import trained_state

pytestmark = [pytest.mark.faults]

MAX_CASES = 60  # per operation
CALL_LIMIT_S = 2.0


def _app():
    store = SnapshotStore(Path(tempfile.mkdtemp(prefix="fuzz-store-")))
    store.publish(trained_state(300), offsets={"t": {0: 300}}, watermark=1)
    app = create_app(store, watch=False)
    assert app.state.watcher.poll_once()
    return app


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())
CASES = {"run": 0}


@schema.parametrize()
@settings(max_examples=MAX_CASES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_no_hangs(case: schemathesis.Case) -> None:
    t0 = time.monotonic()
    response = case.call()
    elapsed = time.monotonic() - t0
    CASES["run"] += 1
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: " \
        f"{response.status_code} {response.text[:200]}"
    assert elapsed < CALL_LIMIT_S, f"{case.method} {case.formatted_path} took {elapsed:.1f} s"
    case.validate_response(response, excluded_checks=[status_code_conformance,
                                                      negative_data_rejection])


@pytest.fixture(autouse=True, scope="module")
def _report_cases():
    yield
    print(f"\napi fuzz: {CASES['run']} cases, no 5xx, none over {CALL_LIMIT_S:g} s")
