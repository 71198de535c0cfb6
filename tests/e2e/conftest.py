from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pieces_os_client.api.model_api import ModelApi
from pieces_os_client.api.models_api import ModelsApi
from pieces_os_client.api_client import ApiClient
from pieces_os_client.configuration import Configuration

from tests.daemon import Daemon

DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    made: list[Daemon] = []

    def make(models: list[dict[str, Any]] | None = None, **sections: dict[str, Any]) -> Daemon:
        daemon = Daemon(tmp_path / f"d{len(made)}", models, **sections)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()


class Sdk:
    """The official pieces-os-client against one daemon."""

    def __init__(self, url: str) -> None:
        self.client = ApiClient(Configuration(host=url))
        self.model = ModelApi(self.client)
        self.models = ModelsApi(self.client)


@pytest.fixture
def sdk_for() -> Callable[[Daemon], Sdk]:
    return lambda daemon: Sdk(daemon.url)


def create(daemon: Daemon, name: str, **extra: Any) -> str:
    """POST /models/create; the new custom model's id."""
    r = httpx.post(f"{daemon.url}/models/create", json={"name": name, **extra})
    assert 200 == r.status_code, r.text
    model_id: str = r.json()["id"]
    return model_id


def upload(daemon: Daemon, model_id: str, path: Path) -> httpx.Response:
    """PUT /model/{id}/file with the bytes of `path`."""
    return httpx.put(f"{daemon.url}/model/{model_id}/file", content=path.read_bytes(),
                     headers={"content-type": "application/octet-stream"}, timeout=120)
