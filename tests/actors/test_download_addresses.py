"""Which addresses a download connects to (actors/addresses.py): the rule on addresses, the
probe's checks before and after connecting (fake resolver; a fake transport or the real
origin), and the pump's own connect."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
import trio

from actors.addresses import LINK_LOCAL, PRIVATE, PUBLIC, Blocked, connect, first_refusal, kind
from actors.download import DownloadRequest, OriginError, SizeMismatch, UrlRefused, download_file
from tests.actors.test_download import Sink
from tests.origin import open_origin

PUBLIC_IP, OTHER_PUBLIC_IP = "93.184.216.34", "93.184.216.35"


@pytest.mark.parametrize(("address", "expected"), [
    ("169.254.169.254", LINK_LOCAL), ("169.254.0.1", LINK_LOCAL), ("fe80::1", LINK_LOCAL),
    ("fe80::1%eth0", LINK_LOCAL), ("::ffff:169.254.169.254", LINK_LOCAL),
    ("127.0.0.1", PRIVATE), ("10.1.2.3", PRIVATE), ("172.16.0.1", PRIVATE),
    ("192.168.1.1", PRIVATE), ("::1", PRIVATE), ("fd00::1", PRIVATE), ("0.0.0.0", PRIVATE),
    ("100.64.0.1", PRIVATE), ("::ffff:10.0.0.1", PRIVATE),
    (PUBLIC_IP, PUBLIC), ("2606:4700::1111", PUBLIC),
])
def test_the_kinds_of_addresses(address: str, expected: str) -> None:
    assert expected == kind(address)


def test_the_rule() -> None:
    # Link-local: never, whatever is allowed.
    assert "link-local" in (first_refusal("m.test", [PUBLIC_IP, "169.254.169.254"],
                                          private_ok=True) or "")
    # Private: only when allowed (the user's own host, a private origin, allow_private).
    assert first_refusal("10.0.0.1", ["10.0.0.1"], private_ok=True) is None
    why = first_refusal("db.test", ["10.0.0.1"], private_ok=False)
    assert why is not None and why.startswith("db.test (10.0.0.1) is a private")
    assert "allow_private" in why
    assert first_refusal("m.test", [PUBLIC_IP], private_ok=False) is None


def fake_resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return table.get(host, [])

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


async def probe(tmp_path: Path, table: dict[str, list[str]], answers: dict[str, httpx.Response],
                **kw: object) -> list[str]:
    """Download https://models.test/m through a fake transport; returns the hosts asked."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return answers[request.url.host]

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        await download_file(DownloadRequest("https://models.test/m", tmp_path / "m",
                                            retries=0, **kw),  # type: ignore[arg-type]
                            Sink(), client=client, resolve=fake_resolver(table))
    return seen


def to(location: str) -> httpx.Response:
    return httpx.Response(302, headers={"Location": location})


@pytest.mark.parametrize("target", ["https://169.254.169.254/latest/meta-data/",
                                    "https://[fe80::1]/x", "https://metadata.test/x",
                                    "https://db.test/x", "https://10.0.0.7/x",
                                    "https://127.0.0.1:1000/models"])
async def test_a_public_origin_cannot_redirect_inward(tmp_path: Path, target: str) -> None:
    """Refused before any request reaches the target (the name checked, not just literals)."""
    table = {"models.test": [PUBLIC_IP], "metadata.test": ["169.254.169.254"],
             "db.test": [OTHER_PUBLIC_IP, "10.0.0.5"]}
    seen: list[str] = []
    with pytest.raises(UrlRefused, match="refusing a redirect target") as err:
        seen = await probe(tmp_path, table, {"models.test": to(target)})
    assert "url_refused" == err.value.code
    assert seen in ([], ["models.test"])
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


async def test_link_local_is_refused_even_with_allow_private(tmp_path: Path) -> None:
    with pytest.raises(UrlRefused, match="link-local"):
        await probe(tmp_path, {"models.test": [PUBLIC_IP]},
                    {"models.test": to("https://169.254.169.254/x")}, allow_private=True)


async def test_allow_private_follows_but_repeats_nothing_of_the_answer(tmp_path: Path) -> None:
    """With allow_private the redirect is followed; what the internal address answers (its
    status, its size) appears in no error."""
    table = {"models.test": [PUBLIC_IP], "db.test": ["10.0.0.5"]}
    with pytest.raises(OriginError) as err:
        await probe(tmp_path, table, {"models.test": to("https://db.test/x"),
                                      "db.test": httpx.Response(404)}, allow_private=True)
    assert "404" not in str(err.value) and "internal address" in str(err.value)
    sized = httpx.Response(206, headers={"Content-Range": "bytes 0-0/31337"}, content=b"x")
    with pytest.raises(SizeMismatch) as err2:
        await probe(tmp_path, table, {"models.test": to("https://db.test/x"), "db.test": sized},
                    allow_private=True, size=1000)
    assert "31337" not in str(err2.value)


async def test_a_private_origin_may_redirect_to_private_addresses(tmp_path: Path) -> None:
    """A mirror on the local network redirecting within it is followed (the 404 shows that the
    request reached it)."""
    table = {"models.test": ["192.168.1.2"], "db.test": ["10.0.0.5"]}
    with pytest.raises(OriginError):
        seen = await probe(tmp_path, table, {"models.test": to("https://db.test/x"),
                                             "db.test": httpx.Response(404)})
        assert ["models.test", "db.test"] == seen


async def test_the_address_connected_to_is_checked(tmp_path: Path) -> None:
    """A name that resolved to a public address but connects to loopback (DNS rebinding) is
    refused on the probe's real connection, before its answer is used."""
    data = b"GGUF" + bytes(1000)
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.redirect("/a", f"http://localhost:{origin.port}/m")
            # The probe's resolver says public; the connection lands on loopback.
            resolve = fake_resolver({"localhost": [PUBLIC_IP]})
            url = f"http://localhost:{origin.port}/a"
            with pytest.raises(UrlRefused, match=r"localhost \(127\.0\.0\.1\) is a private"):
                await download_file(DownloadRequest(url, tmp_path / "m",
                                                    allow_http=True, retries=0), Sink(),
                                    resolve=resolve)
    assert not (tmp_path / "m").exists()


async def test_a_loopback_origin_redirecting_to_link_local_never_connects(
        tmp_path: Path) -> None:
    """The real origin (loopback) redirects to an unroutable link-local address: refused at
    once, with no connection attempt (which would take the connect timeout)."""
    with trio.fail_after(10):
        async with open_origin() as origin:
            origin.redirect("/a", "http://169.254.0.1:9/m")
            began = time.monotonic()
            with pytest.raises(UrlRefused, match="link-local"):
                await download_file(DownloadRequest(origin.url("/a"), tmp_path / "m",
                                                    allow_http=True), Sink())
    assert time.monotonic() - began < 2
    assert 1 == len(origin.requests)


def test_the_pump_connects_only_where_the_rule_allows() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with pytest.raises(Blocked, match="private"):
            connect("127.0.0.1", port, 1.0, private_ok=False)
        began = time.monotonic()
        with pytest.raises(Blocked, match="link-local"):
            connect("169.254.0.1", 9, 5.0, private_ok=True)
        assert time.monotonic() - began < 1
        connect("127.0.0.1", port, 1.0, private_ok=True).close()
