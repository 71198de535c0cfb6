"""actors/pump.py: the child that moves a download's bytes, where it fails to start or dies."""

from __future__ import annotations

import functools
import os
import random
import shutil
import ssl
from pathlib import Path

import attrs
import h11
import pytest
import trio

from actors.heads import Refused, judge_body
from actors.pump import PumpFailed, PumpProcess, with_pump
from tests.origin import make_certificate, open_origin

MiB = 1024 * 1024


async def test_a_pump_that_cannot_start_is_a_clear_failure(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    ran: list[PumpProcess] = []

    async def body(pump: PumpProcess) -> None:
        ran.append(pump)

    try:
        with pytest.raises(PumpFailed) as err:
            await with_pump(fd, body, python=str(tmp_path / "no-python"))
    finally:
        os.close(fd)
    assert "died" == err.value.kind
    assert "cannot start the download's pump process" in err.value.reason
    assert [] == ran


async def test_hashing_in_the_child_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 * 1024 * 1024 + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    got: list[tuple[int, str]] = []

    async def body(pump: PumpProcess) -> None:
        assert 1000 == await pump.hash_upto(1000)  # a part, then the rest from there
        reached = await pump.hash_upto(10 * len(data))  # stops at the end of the file
        got.append((reached, await pump.hexdigest()))
        await pump.hash_reset()
        await pump.hash_upto(len(data))
        got.append((pump.hashed, await pump.hexdigest()))

    try:
        with trio.fail_after(20):
            await with_pump(fd, body)
    finally:
        os.close(fd)
    digest = hashlib.sha256(data).hexdigest()
    assert [(len(data), digest), (len(data), digest)] == got


GOOD = [("Content-Range", "bytes 100-199/1000"), ("ETag", '"abc"'), ("Content-Length", "100")]


@pytest.mark.parametrize(("status", "headers", "kind"), [
    (206, GOOD, None),
    (206, [*GOOD, ("Content-Encoding", "identity")], None),
    (206, [("Content-Range", "bytes 100-199/1000")], None),  # no ETag now: Content-Range says
    (200, GOOD, "changed"),  # the whole file: start over
    (302, [("Location", "/x")], "changed"),
    (206, [("Content-Range", "bytes 0-99/1000")], "changed"),  # not the range asked for
    (206, [("Content-Range", "bytes 100-199/2000")], "changed"),  # another size
    (206, [("Content-Range", "bytes 100-199/*")], "changed"),
    (206, [("Content-Range", "bytes 100-199/1000"), ("ETag", '"new"')], "changed"),
    (206, [*GOOD, ("Content-Range", "bytes 100-199/1000")], "changed"),  # two ranges
    (206, [("ETag", '"abc"')], "changed"),
    (206, [*GOOD, ("Transfer-Encoding", "chunked")], "transient"),
    (206, [*GOOD, ("Content-Encoding", "gzip")], "origin"),
    (503, [("Retry-After", "7")], "transient"),
    (404, [], "origin"),
])
def test_one_judge_of_range_answers(status: int, headers: list[tuple[str, str]],
                                    kind: str | None) -> None:
    try:
        judge_body(status, headers, start=100, total=1000, etag='"abc"', ranged=True)
    except Refused as refusal:
        assert kind == refusal.kind
        if status == 503:
            assert 7.0 == refusal.retry_after
    else:
        assert kind is None


def test_an_origin_without_ranges_must_send_the_whole_file() -> None:
    judge_body(200, [], start=0, total=None, etag=None, ranged=False)
    with pytest.raises(Refused) as err:
        judge_body(206, [("Content-Range", "bytes 0-9/10")], start=0, total=10, etag=None,
                   ranged=False)
    assert "changed" == err.value.kind


# -- the body's way from socket to file


async def pump_once(path: Path, url: str, size: int, *, ranged: bool = True) -> PumpProcess:
    """One fetch of the whole file at `url` through a pump writing to `path`."""
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    used: list[PumpProcess] = []

    @attrs.define
    class At:
        pos: int

    async def body(pump: PumpProcess) -> None:
        used.append(pump)
        headers = {"Range": f"bytes=0-{size - 1}"} if ranged else {}
        await pump.fetch(scheme=url.split(":", 1)[0], host=host, port=int(port),
                         target="/" + url.split("://", 1)[1].split("/", 1)[1],
                         netloc=host_port, headers=headers, at=At(0),
                         end=size if ranged else None, stall_timeout=10, moved=lambda: None,
                         total=size, etag=None, ranged=ranged)

    try:
        await with_pump(fd, body)
    finally:
        os.close(fd)
    return used[0]


async def test_a_plain_tcp_body_is_spliced_into_the_file(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(20 * MiB + 17)
    with trio.fail_after(30):
        async with open_origin() as origin:
            origin.add("/m", data)
            pump = await pump_once(tmp_path / "f", origin.url("/m"), len(data))
    assert data == (tmp_path / "f").read_bytes()
    assert 1 == pump.spliced


async def test_a_whole_file_answer_without_ranges_arrives_whole(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(3 * MiB)
    with trio.fail_after(30):
        async with open_origin() as origin:
            origin.add("/m", data)
            origin.faults("/m").ignore_range = True
            await pump_once(tmp_path / "f", origin.url("/m"), len(data), ranged=False)
    assert data == (tmp_path / "f").read_bytes()


async def test_a_chunked_body_without_a_size_arrives_whole(tmp_path: Path) -> None:
    """An origin without ranges that sends the file chunked (no Content-Length): the pump
    reads it through h11 to its end."""
    data = random.Random(7).randbytes(3 * MiB + 11)

    async def serve(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.EndOfMessage):
                break
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])))
        for i in range(0, len(data), 100_000):
            await stream.send_all(conn.send(h11.Data(data=data[i : i + 100_000])))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        await stream.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            await pump_once(tmp_path / "f", f"http://127.0.0.1:{port}/m", len(data),
                            ranged=False)
            nursery.cancel_scope.cancel()
    assert data == (tmp_path / "f").read_bytes()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_a_tls_body_is_received_and_written(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = random.Random(5).randbytes(6 * MiB + 5)
    cert, key = make_certificate(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the child's trust
    with trio.fail_after(60):
        async with open_origin(tls=server) as origin:
            origin.add("/m", data)
            pump = await pump_once(tmp_path / "f", origin.url("/m"), len(data))
    assert data == (tmp_path / "f").read_bytes()
    assert 0 == pump.spliced  # TLS is decrypted in the child: recv_into, pwrite


async def test_an_unverified_body_is_handed_to_the_disk_as_it_comes(tmp_path: Path) -> None:
    """Without a sha256 nothing hashes the file, yet every written byte has been handed to the
    disk (sync_file_range) when the pump ends: the fsync before publishing has little left."""
    data = random.Random(6).randbytes(24 * MiB + 3)
    with trio.fail_after(30):
        async with open_origin() as origin:
            origin.add("/m", data)
            pump = await pump_once(tmp_path / "f", origin.url("/m"), len(data))
    assert data == (tmp_path / "f").read_bytes()
    assert len(data) == pump.handed
