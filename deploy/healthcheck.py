"""Docker HEALTHCHECK: GET /healthz of the stream-rec role running in this container.

The role is read from the container's main process (``stream-rec serve`` or
``stream-rec worker``) and the port from the same settings that process uses.
One-shot commands (``topics``, ``replay``…) and a worker without
``worker.metrics_port`` have no endpoint: they count as healthy. A server with
``serve.ssl_certfile`` is probed over HTTPS without verifying its certificate
(it names the service, not 127.0.0.1; this only asks whether the process
answers). ``STREAM_REC_HEALTHCHECK_URL`` overrides all of this.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def health_url() -> str | None:
    url = os.environ.get("STREAM_REC_HEALTHCHECK_URL")
    if url:
        return url
    try:
        with open("/proc/1/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    from stream_rec.settings import load_settings

    settings = load_settings()
    if b"serve" in argv:
        scheme = "https" if settings.serve.ssl_certfile else "http"
        return f"{scheme}://127.0.0.1:{settings.serve.port}/healthz"
    if b"worker" in argv and settings.worker.metrics_port:
        return f"http://127.0.0.1:{settings.worker.metrics_port}/healthz"
    return None


def main() -> int:
    url = health_url()
    if url is None:
        return 0
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as resp:
            return 0 if resp.status == 200 else 1
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
