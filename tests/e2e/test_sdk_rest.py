"""The last two Model calls of the official SDK: scores and removing a model's files while
keeping the model. A real daemon, the real pieces-os-client, the real `modeld` CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pieces_os_client.exceptions import ApiException
from pieces_os_client.models.model_delete_cache_input import ModelDeleteCacheInput
from pieces_os_client.models.seeded_score import SeededScore
from pieces_os_client.models.seeded_score_increment import SeededScoreIncrement

from tests.daemon import Daemon
from tests.e2e.conftest import DaemonFactory, Sdk
from tests.e2e.test_cli import modeld
from tests.gguf_factory import write_tiny_llama


def imported(daemon: Daemon, path: Path, name: str) -> str:
    r = httpx.post(f"{daemon.url}/models/create", json={"name": name})
    model_id: str = r.json()["id"]
    r = httpx.put(f"{daemon.url}/model/{model_id}/file", content=path.read_bytes(),
                  headers={"content-type": "application/octet-stream"}, timeout=60)
    assert 200 == r.status_code, r.text
    return model_id


def test_scores_count_and_last_for_custom_models(
        make_daemon: DaemonFactory, sdk_for: Callable[[Daemon], Sdk], tmp_path: Path) -> None:
    daemon = make_daemon([{"id": "cat", "name": "Cat", "url": "http://127.0.0.1:9/c.gguf"}])
    daemon.start()
    sdk = sdk_for(daemon)
    custom = imported(daemon, write_tiny_llama(tmp_path / "t.gguf"), "Scored")
    for _ in range(2):
        sdk.model.model_scores_increment(custom, seeded_score_increment=SeededScoreIncrement(
            model=SeededScore(reuse=True, update=True)))
    sdk.model.model_scores_increment("cat", seeded_score_increment=SeededScoreIncrement(
        model=SeededScore(searched=True)))
    score = sdk.model.models_specific_model_snapshot(custom).score
    assert (4, 2, 2, 0) == (score.manual, score.reuse, score.update, score.searched)
    assert 1 == sdk.model.models_specific_model_snapshot("cat").score.searched
    bad = httpx.post(f"{daemon.url}/model/{custom}/scores/increment",
                     json={"model": {"reuse": "yes"}})
    assert (400, "$.model.reuse: expected a boolean") == (bad.status_code,
                                                           bad.json()["message"])
    with pytest.raises(ApiException) as gone:
        sdk.model.model_scores_increment("nope", seeded_score_increment=SeededScoreIncrement())
    assert 410 == gone.value.status
    # Durable for custom models, across a restart.
    assert 0 == daemon.stop()
    daemon.start()
    assert 2 == sdk_for(daemon).model.models_specific_model_snapshot(custom).score.reuse
    assert 0 == daemon.stop()


def test_delete_cache_removes_the_files_and_keeps_the_model(
        make_daemon: DaemonFactory, sdk_for: Callable[[Daemon], Sdk], tmp_path: Path) -> None:
    daemon = make_daemon().start()
    sdk = sdk_for(daemon)
    tiny = write_tiny_llama(tmp_path / "t.gguf")
    model_id = imported(daemon, tiny, "Cached")
    sdk.model.model_specific_model_load(model_id)
    out = sdk.models.models_delete_specific_model_cache(
        model_id, model_delete_cache_input=ModelDeleteCacheInput())
    assert model_id == out.model.id
    after = sdk.model.models_specific_model_snapshot(model_id)
    assert (False, False, True) == (after.loaded, after.downloaded, after.custom)
    assert not (daemon.storage / "models" / f"{model_id}.gguf").exists()
    assert (daemon.storage / "custom" / f"{model_id}.json").exists()
    # The same through the command line: the model stays registered.
    again = imported(daemon, tiny, "Cached again")
    kept = modeld(daemon.url, "rm", "--keep-record", again)
    assert (0, f"removed the files of {again}; it stays registered\n") == (
        kept.returncode, kept.stdout)
    nothing = modeld(daemon.url, "rm", "--keep-record", again)
    assert nothing.stdout.startswith(f"nothing to remove: {again} has no files")
    assert again in [m.id for m in sdk.models.models_snapshot().iterable]
    assert 0 == daemon.stop()
