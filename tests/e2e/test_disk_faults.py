"""Disk faults injected into a real daemon with libfiu (Debian's fiu-utils): the download
fails with a clear error, the daemon keeps answering, nothing is published, and the partial is
kept so a later download resumes."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
import trio

from tests.e2e.conftest import DaemonFactory
from tests.e2e.test_download_e2e import MiB, entry, payload, started, watch
from tests.origin import open_origin

FIU_RUN = shutil.which("fiu-run")
pytestmark = pytest.mark.skipif(FIU_RUN is None, reason="fiu-run (Debian fiu-utils) is missing")


@pytest.mark.parametrize(
    ("errno_value", "code", "words"),
    [(28, "disk_full", "space"), (5, "disk_error", "")],
    ids=["ENOSPC", "EIO"],
)
async def test_write_faults_fail_cleanly_and_publish_nothing(
    make_daemon: DaemonFactory, errno_value: int, code: str, words: str
) -> None:
    data = payload(3 * MiB, seed=errno_value)
    assert FIU_RUN is not None
    # Without splice (which libfiu does not intercept) the pump writes model data with pwrite;
    # only those writes fail.
    fault = [FIU_RUN, "-x", "-c", f"enable name=posix/io/rw/pwrite,failinfo={errno_value}"]
    no_splice = {"MODELD_SPLICE": "0"}
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/f.gguf", data)
            daemon = make_daemon([entry(origin, "/f.gguf", data)])
            await trio.to_thread.run_sync(lambda: daemon.start(prefix=fault, env=no_splice))
            async with httpx.AsyncClient() as client:
                r = await client.post(f"{daemon.url}/model/f/download")
                assert 200 == r.status_code
                messages, close = await watch(daemon, "f")
                assert ("FAILED", 1000) == (messages[-1]["status"], close)
                error = messages[-1]["error"]
                assert words in error.lower()
                assert "kept" not in error  # no byte was written: no partial to speak of
                # Still answering, nothing published.
                r = await client.get(f"{daemon.url}/models")
                assert 200 == r.status_code
                snap = (await client.get(f"{daemon.url}/model/f")).json()
                assert ("absent", False, error) == (snap["state"], snap["downloaded"],
                                                    snap["error"])
            failed = daemon.events("download_failed")
            assert [code] == [line["code"] for line in failed]
            assert not (daemon.storage / "models" / "f.gguf").exists()
            assert [] == daemon.events("request_crashed")
            assert 0 == await trio.to_thread.run_sync(daemon.stop)

            # Without the fault the same model downloads and verifies.
            await started(daemon)
            async with httpx.AsyncClient() as client:
                await client.post(f"{daemon.url}/model/f/download")
            messages, _ = await watch(daemon, "f")
            assert "COMPLETED" == messages[-1]["status"]
            assert data == (daemon.storage / "models" / "f.gguf").read_bytes()
            assert 0 == await trio.to_thread.run_sync(daemon.stop)


def test_creating_a_model_on_a_full_disk_is_507(make_daemon: DaemonFactory) -> None:
    assert FIU_RUN is not None
    daemon = make_daemon().start(prefix=[FIU_RUN, "-x"])
    assert daemon.proc is not None
    pid = str(daemon.proc.pid)
    # A first create with room: what the route imports lazily is imported then
    warm = httpx.post(f"{daemon.url}/models/create", json={"name": "warm"}).json()["id"]
    # Every open() of the daemon fails with ENOSPC meanwhile: the record cannot be written
    subprocess.run(["fiu-ctrl", "-c", "enable name=posix/io/oc/open,failinfo=28", pid],
                   check=True, timeout=10)
    try:
        r = httpx.post(f"{daemon.url}/models/create", json={"name": "no room"}, timeout=30)
    finally:
        subprocess.run(["fiu-ctrl", "-c", "disable name=posix/io/oc/open", pid], check=True,
                       timeout=10)
    assert (507, "disk_full") == (r.status_code, r.json()["error"]), r.text
    assert [warm] == [m["id"] for m in httpx.get(f"{daemon.url}/models").json()["iterable"]
                      if m["custom"]]
    assert 200 == httpx.post(f"{daemon.url}/models/create", json={"name": "room"}).status_code
    assert 0 == daemon.stop()
