"""Hub references end to end: a fake Hub on loopback (tests/hub.py), huggingface_hub's real
HfApi for the metadata, a real daemon and the real `modeld` command line for the rest."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

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
    again = modeld(url, "pull", "hf.co/user/repo:Q4_K_M")
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
    again = modeld(offline.url, "pull", "hf.co/user/repo:q4_k_m")
    assert 0 == again.returncode, again.stderr
    assert f"{model_id} already downloaded" in again.stdout
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
