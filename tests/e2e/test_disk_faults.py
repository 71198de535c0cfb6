"""Disk faults injected into a real daemon with libfiu (Debian's fiu-utils): the download
fails with a clear error, the daemon keeps answering, nothing is published, and the partial is
kept so a later download resumes."""

from __future__ import annotations

import shutil

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
    # The downloader writes model data with pwrite; only those writes fail.
    fault = [FIU_RUN, "-x", "-c", f"enable name=posix/io/rw/pwrite,failinfo={errno_value}"]
    with trio.fail_after(60):
        async with open_origin() as origin:
            origin.add("/f.gguf", data)
            daemon = make_daemon([entry(origin, "/f.gguf", data)])
            await trio.to_thread.run_sync(lambda: daemon.start(prefix=fault))
            async with httpx.AsyncClient() as client:
                r = await client.post(f"{daemon.url}/model/f/download")
                assert 200 == r.status_code
                messages, close = await watch(daemon, "f")
                assert ("FAILED", 1000) == (messages[-1]["status"], close)
                error = messages[-1]["error"]
                assert words in error.lower()
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
