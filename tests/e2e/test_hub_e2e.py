"""Hub references end to end: a fake Hub on loopback (tests/hub.py), huggingface_hub's real
HfApi for the metadata, a real daemon and the real `modeld` command line for the rest."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from actors.errors import InvalidInput, Unavailable
from supervisor.hub import resolve
from supervisor.hub_refs import HubRef
from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_cli import modeld
from tests.gguf_factory import gguf_of_size
from tests.hub import FakeHub, open_fake_hub

FIRST = gguf_of_size(300_000, seed=1)
SECOND = gguf_of_size(310_000, seed=2)
Q8 = gguf_of_size(200_000, seed=3)
TOKEN = "hf_" + "T0kenForTheFakeHub" * 2


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with open_fake_hub() as hub:
        yield hub


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_resolution_through_hfapi(hub: FakeHub) -> None:
    commit = hub.publish("user/repo", {"m.Q4_K_M.gguf": FIRST, "m.Q8_0.gguf": Q8})
    hub.missing("user/nope")
    with trio.fail_after(30):
        resolved = await resolve(HubRef("user/repo"), hub.endpoint)
        assert (commit, "m.Q4_K_M.gguf", len(FIRST), hashlib.sha256(FIRST).hexdigest()) == (
            resolved.commit, resolved.file, resolved.size, resolved.sha256)
        assert f"{hub.endpoint}/user/repo/resolve/{commit}/m.Q4_K_M.gguf" == resolved.url
        seen = hub.api.seen("/api/models/user/repo")
        assert 1 == len(seen)  # one metadata request, and no file bytes from the Hub's host
        assert not hub.cdn.requests
        with pytest.raises(InvalidInput, match="user/nope") as unknown:
            await resolve(HubRef("user/nope"), hub.endpoint)
        assert "hub_repo_not_found" == unknown.value.code
        with pytest.raises(InvalidInput) as revision:
            await resolve(HubRef("user/repo", revision="v9"), hub.endpoint)
        assert "hub_not_found" == revision.value.code
        # A gated repository: its metadata is public, its files need a token with access.
        hub.gated["user/gated"] = TOKEN
        hub.publish("user/gated", {"g.Q4_K_M.gguf": FIRST})
        for token, todo in ((None, "set [hub] token_file"), ("hf_wrong" * 4, "has no access")):
            with pytest.raises(InvalidInput) as gated:
                await resolve(HubRef("user/gated"), hub.endpoint, token)
            assert ("hub_repo_gated", True, True, True) == (
                gated.value.code, "user/gated" in str(gated.value), todo in str(gated.value),
                f"{hub.endpoint}/user/gated" in str(gated.value)), str(gated.value)
            assert token is None or token not in str(gated.value)
        allowed = await resolve(HubRef("user/gated"), hub.endpoint, TOKEN)
        assert "g.Q4_K_M.gguf" == allowed.file
        # The token went with the metadata requests that had it, and nowhere else.
        assert [f"Bearer {'hf_wrong' * 4}"] * 2 + [f"Bearer {TOKEN}"] * 2 == (
            hub.seen_authorization(hub.api))
        assert not hub.cdn.requests
        offline = f"http://127.0.0.1:{closed_port()}"
        with pytest.raises(Unavailable, match=offline) as down:
            await resolve(HubRef("user/repo"), offline)
        assert "hub_unreachable" == down.value.code


def test_pull_create_verify_pin(make_daemon: DaemonFactory, hub: FakeHub) -> None:
    first = hub.publish("user/repo", {"m.Q4_K_M.gguf": FIRST, "m.Q8_0.gguf": Q8})
    hub.publish("user/bad", {"b.Q4_K_M.gguf": FIRST}, lfs_sha256={"b.Q4_K_M.gguf": "0" * 64})
    hub.publish("user/multi", {"a.Q8_0.gguf": Q8, "a.Q5_K_M.gguf": Q8})
    hub.missing("user/nope")
    catalog = [{"id": "cat-hub", "name": "Catalog Hub", "source": "hf.co/user/repo:Q8_0"}]
    daemon = make_daemon(catalog, hub={"endpoint": hub.endpoint}).start()
    url = daemon.url
    models = daemon.storage / "models"

    pulled = modeld(url, "pull", "hf.co/user/repo:q4_k_m")
    assert 0 == pulled.returncode, pulled.stderr
    model_id = "hf-user-repo-q4_k_m"
    assert f"hf.co/user/repo:q4_k_m: {model_id} (m.Q4_K_M.gguf at {first[:12]})" == (
        pulled.stdout.splitlines()[0])
    assert FIRST == (models / f"{model_id}.gguf").read_bytes()
    model = httpx.get(f"{url}/model/{model_id}").json()
    assert ("hf.co/user/repo:Q4_K_M", first, "m.Q4_K_M.gguf") == (
        model["source"], model["revision"], model["file"])
    assert (True, True, hashlib.sha256(FIRST).hexdigest(), "Q4_K_M", "repo Q4_K_M") == (
        model["downloaded"], model["custom"], model["sha256"], model["quantization"],
        model["name"])

    # Its url and sha256 are the Hub's: an update may resend them, not change them.
    model["name"] = "Renamed"
    assert 200 == httpx.post(f"{url}/model/update", json=model).status_code
    changed = httpx.post(f"{url}/model/update",
                         json={"id": model_id, "url": "https://elsewhere.example/m.gguf"})
    assert (400, "source_pinned") == (changed.status_code, changed.json()["error"])

    # The branch moves on: the record stays pinned, whichever form names the same file.
    second = hub.publish("user/repo", {"m.Q4_K_M.gguf": SECOND, "m.Q8_0.gguf": Q8})
    again = modeld(url, "pull", model_id)  # by id: no update (by reference: see below)
    assert 0 == again.returncode, again.stderr
    assert f"{model_id} already downloaded" in again.stdout
    default = httpx.post(f"{url}/models/create", json={"source": "hf.co/user/repo"}).json()
    assert (model_id, first) == (default["id"], default["revision"])
    assert FIRST == (models / f"{model_id}.gguf").read_bytes()
    # A revision named explicitly is another model, pinned to what it names now.
    at_head = httpx.post(f"{url}/models/create", json={
        "source": "https://huggingface.co/user/repo/blob/main/m.Q4_K_M.gguf"}).json()
    assert at_head["id"].startswith(f"{model_id}-") and second == at_head["revision"]

    # The catalog's source is resolved at its first download, never before; its reference
    # names it.
    assert "revision" not in httpx.get(f"{url}/model/cat-hub").json()
    named = httpx.post(f"{url}/models/create", json={"source": "huggingface.co/user/repo:q8_0"})
    assert "cat-hub" == named.json()["id"]
    assert 200 == httpx.post(f"{url}/model/cat-hub/download").status_code
    daemon.wait_for("download_completed", model="cat-hub")
    assert Q8 == (models / "cat-hub.gguf").read_bytes()
    assert (second, "m.Q8_0.gguf") == tuple(
        httpx.get(f"{url}/model/cat-hub").json()[k] for k in ("revision", "file"))

    # The Hub's LFS sha256 is the one checked: a file that does not match is never published.
    bad = modeld(url, "pull", "hf.co/user/bad")
    assert 1 == bad.returncode
    assert "sha256" in bad.stderr, bad.stderr
    assert not (models / "hf-user-bad-q4_k_m.gguf").exists()
    assert httpx.get(f"{url}/model/hf-user-bad-q4_k_m").json()["downloaded"] is False

    def refused(source: str) -> dict[str, str]:
        response = httpx.post(f"{url}/models/create", json={"source": source})
        assert 400 == response.status_code, response.text
        body: dict[str, str] = response.json()
        return body

    unknown = refused("hf.co/user/nope")
    assert ("hub_repo_not_found", True) == (unknown["error"], "user/nope" in unknown["message"])
    quant = refused("hf.co/user/repo:Q2_K")
    assert "hub_quant_not_found" == quant["error"]
    assert "Q4_K_M, Q8_0" in quant["message"]
    ambiguous = refused("hf.co/user/multi")
    assert "hub_quant_ambiguous" == ambiguous["error"]
    assert "Q5_K_M, Q8_0" in ambiguous["message"]
    assert "invalid_reference" == refused("hf.co/user")["error"]
    failed = modeld(url, "pull", "hf.co/user/multi")  # the CLI says the daemon's reason
    assert (1, True) == (failed.returncode, "Q5_K_M, Q8_0" in failed.stderr)
    listed = httpx.get(f"{url}/models").json()["iterable"]
    assert not [m for m in listed if m["id"].startswith(("hf-user-nope", "hf-user-multi"))]

    # Offline: a restart with the Hub out of reach starts at once, pins and files intact, and
    # the reference that made a model still finds it.
    assert 0 == daemon.stop()
    offline = make_daemon(catalog, hub={"endpoint": f"http://127.0.0.1:{closed_port()}"},
                          storage={"dir": str(daemon.storage)}).start()
    cat_model = httpx.get(f"{offline.url}/model/cat-hub").json()
    assert (True, second, "hf.co/user/repo:Q8_0") == (
        cat_model["downloaded"], cat_model["revision"], cat_model["source"])
    again = modeld(offline.url, "pull", "hf.co/user/repo:q4_k_m")  # no update check offline
    assert 0 == again.returncode, again.stderr
    assert f"{model_id} already downloaded" in again.stdout
    assert "could not check" in again.stderr and offline.url not in again.stderr
    assert first == httpx.get(f"{offline.url}/model/{model_id}").json()["revision"]
    unreachable = httpx.post(f"{offline.url}/models/create", json={"source": "hf.co/user/new"})
    assert (503, "hub_unreachable") == (unreachable.status_code, unreachable.json()["error"])


def test_gated_repo_token_goes_to_the_hub_only(make_daemon: DaemonFactory, hub: FakeHub,
                                               tmp_path: Path) -> None:
    hub.gated["user/gated"] = TOKEN
    hub.gated["user/other"] = "hf_" + "SomebodyElsesToken" * 2
    commit = hub.publish("user/gated", {"g.Q4_K_M.gguf": FIRST})
    hub.publish("user/other", {"o.Q4_K_M.gguf": FIRST})
    token_file = tmp_path / "hub-token"
    token_file.write_text(TOKEN + "\n")
    daemon = make_daemon([], hub={"endpoint": hub.endpoint, "token_file": str(token_file)})
    daemon.start()
    url, answers = daemon.url, []

    pulled = modeld(url, "pull", "hf.co/user/gated")
    answers += [pulled.stdout, pulled.stderr]
    assert 0 == pulled.returncode, pulled.stderr
    assert FIRST == (daemon.storage / "models" / "hf-user-gated-q4_k_m.gguf").read_bytes()
    # The Hub's host got the token (metadata, access check, the file's resolve request); the
    # CDN it redirects to never did.
    resolve_path = f"/user/gated/resolve/{commit}/g.Q4_K_M.gguf"
    assert [f"Bearer {TOKEN}"] == [v for r in hub.api.seen(resolve_path) for k, v in r.headers
                                   if k == "authorization"]
    assert hub.cdn.requests and [] == hub.seen_authorization(hub.cdn)

    # A gated repository the token's account may not read: a 400 naming it and what to do.
    refused = httpx.post(f"{url}/models/create", json={"source": "hf.co/user/other"})
    answers.append(refused.text)
    assert (400, "hub_repo_gated") == (refused.status_code, refused.json()["error"])
    assert "user/other" in refused.json()["message"]
    assert "accept the licence" in refused.json()["message"]
    for path in ("/models", "/model/hf-user-gated-q4_k_m", "/status"):
        answers.append(httpx.get(f"{url}{path}").text)
    assert 0 == daemon.stop()
    assert not [a for a in answers if TOKEN in a]
    assert not [line for line in daemon.raw_lines if TOKEN in line]


def test_updates(make_daemon: DaemonFactory, hub: FakeHub) -> None:
    first = hub.publish("user/up", {"u.Q4_K_M.gguf": FIRST, "u.Q8_0.gguf": Q8})
    catalog = [{"id": "cat-up", "name": "Catalog Up", "source": "hf.co/user/up:Q8_0"}]
    daemon = make_daemon(catalog, hub={"endpoint": hub.endpoint, "update_check": "1s"}).start()
    url, models, model_id = daemon.url, daemon.storage / "models", "hf-user-up-q4_k_m"
    assert 0 == modeld(url, "pull", "hf.co/user/up").returncode
    assert 200 == httpx.post(f"{url}/model/cat-up/download").status_code
    daemon.wait_for("download_completed", model="cat-up")

    def model(which: str = model_id) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{url}/model/{which}").json()
        return body

    def cdn_files() -> int:
        return len([r for r in hub.cdn.requests if r.range != "bytes=0-0"])

    # The same file: nothing downloaded, the answer says so.
    before = cdn_files()
    same = modeld(url, "pull", "hf.co/user/up")
    assert 0 == same.returncode, same.stderr
    assert f"{model_id} is up to date (u.Q4_K_M.gguf at {first[:12]})" in same.stdout
    assert before == cdn_files()

    # The branch moves: the Q4_K_M file changes, the Q8_0 file does not. The background check
    # (every second here) shows it, without any request asking.
    second = hub.publish("user/up", {"u.Q4_K_M.gguf": SECOND, "u.Q8_0.gguf": Q8})
    deadline = time.monotonic() + 10
    while model().get("updateAvailable") is not True:
        assert time.monotonic() < deadline, model()
        time.sleep(0.1)
    assert (False, first) == (model("cat-up")["updateAvailable"], model("cat-up")["revision"])
    # The catalog model's file is the same at the new commit: the pin moves, nothing else.
    moved = httpx.post(f"{url}/model/cat-up/download", json={"update": True}).json()
    assert ("up to date", second, True) == (moved["update"], moved["revision"],
                                            moved["downloaded"])
    assert second == json.loads((daemon.storage / "pins" / "cat-up.json").read_text())[
        "revision"]
    assert before == cdn_files()

    # A new file: downloaded beside the old one, verified, then published with its pin.
    updated = modeld(url, "pull", "hf.co/user/up")
    assert 0 == updated.returncode, updated.stderr
    assert f"{model_id} updated" in updated.stdout, updated.stdout
    assert SECOND == (models / f"{model_id}.gguf").read_bytes()
    now = model()
    assert (second, hashlib.sha256(SECOND).hexdigest(), False, "downloaded") == (
        now["revision"], now["sha256"], now["updateAvailable"], now["state"])
    assert not list((daemon.storage / "updates").iterdir())
    record = json.loads((daemon.storage / "custom" / f"{model_id}.json").read_text())
    assert second == record["revision"]

    # A new file that fails its check: the old file and pin stay.
    hub.publish("user/up", {"u.Q4_K_M.gguf": FIRST}, lfs_sha256={"u.Q4_K_M.gguf": "0" * 64})
    bad = httpx.post(f"{url}/model/{model_id}/download", json={"update": True}).json()
    assert ("updating", "downloaded", second) == (bad["update"], bad["state"], bad["revision"])
    failed = daemon.wait_for("hub_update_failed", model=model_id)
    assert "sha256" in failed["reason"]
    assert SECOND == (models / f"{model_id}.gguf").read_bytes()
    assert (second, "downloaded") == (model()["revision"], model()["state"])

    # Only source-backed models update; `update` is a boolean.
    plain = httpx.post(f"{url}/models/create", json={"name": "plain",
                                                     "url": hub.cdn.url("/x.gguf")}).json()
    refused = httpx.post(f"{url}/model/{plain['id']}/download", json={"update": True})
    assert (400, "no_source") == (refused.status_code, refused.json()["error"])
    wrong = httpx.post(f"{url}/model/{model_id}/download", json={"update": "yes"})
    assert (400, "invalid_body") == (wrong.status_code, wrong.json()["error"])
    assert 0 == daemon.stop()
