"""GET /health through the daemon's phases, on the app itself (the e2e test sees it serving)."""

from __future__ import annotations

from typing import cast

import pytest

from supervisor.api.app import create_app
from supervisor.api.ops import Phase, Readiness
from supervisor.config import Config
from supervisor.registry import Registry


@pytest.mark.parametrize(("phase", "status", "body"), [
    (Phase.STARTING, 503, {"status": "starting"}),
    (Phase.SERVING, 200, {"status": "ok"}),
    (Phase.STOPPING, 503, {"status": "stopping"}),
])
async def test_health_follows_the_phase(phase: Phase, status: int, body: dict[str, str]) -> None:
    readiness = Readiness(phase)
    app = create_app(cast(Registry, object()), Config(), token="s3cret-token",
                     readiness=readiness)
    client = app.test_client()
    r = await client.get("/health", headers={"Host": "localhost"})
    assert (status, body) == (r.status_code, await r.get_json())
    # The token guards the rest; a foreign Host is refused even here.
    assert 401 == (await client.get("/models", headers={"Host": "localhost"})).status_code
    assert 403 == (await client.get("/health", headers={"Host": "evil.example"})).status_code

