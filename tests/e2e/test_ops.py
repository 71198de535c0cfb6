"""What operators see, through one real daemon with a token: GET /health, GET /metrics (parsed
by prometheus_client's own parser) and GET /status, after a real download from a real origin,
a load into a real worker, a generation and a failed download."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.daemon import Daemon
from tests.gguf_factory import write_tiny_llama
from tests.origin import Origin, run_origin_in_thread

TOKEN = "ops-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Ops:
    def __init__(self, daemon: Daemon, origin: Origin, tiny: bytes) -> None:
        self.daemon = daemon
        self.origin = origin
        self.tiny = tiny
        self.client = httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    tmp = tmp_path_factory.mktemp("ops")
    tiny = write_tiny_llama(tmp / "tiny.gguf", seed=5).read_bytes()
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    with run_origin_in_thread() as origin:
        origin.add("/tiny.gguf", tiny)
        catalog: list[dict[str, Any]] = [
            {"id": "tiny", "name": "Tiny", "url": origin.url("/tiny.gguf"),
             "sha256": hashlib.sha256(tiny).hexdigest(), "size": len(tiny)},
            # Nothing is served there: its download fails at once.
            {"id": "missing", "name": "Missing", "url": origin.url("/missing.gguf")},
        ]
        daemon = Daemon(tmp / "d", catalog, server={"token_file": str(token_file)},
                        download={"retries": 0})
        daemon.start()
        try:
            yield Ops(daemon, origin, tiny)
            assert 0 == daemon.stop()
        finally:
            daemon.close()


def test_health_answers_without_the_token(ops: Ops) -> None:
    url = ops.daemon.url
    r = httpx.get(f"{url}/health")
    assert (200, {"status": "ok"}) == (r.status_code, r.json())
    assert "application/json" == r.headers["content-type"]
    # It reveals nothing else: the rest still needs the token.
    assert 401 == httpx.get(f"{url}/models").status_code
    assert 401 == httpx.get(f"{url}/health/x").status_code
    # The Host guard applies as everywhere.
    assert 403 == httpx.get(f"{url}/health", headers={"Host": "evil.example"}).status_code
    assert 403 == httpx.get(f"{url}/health", headers={"Origin": "http://evil.example"}
                            ).status_code
