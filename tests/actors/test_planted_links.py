"""Links planted in the storage dir by someone else are never followed (issue 18, item 3): a
symlink at the sidecar's temp name, a symlink at the held marker's name, a hard link at the
partial's name with a sidecar that says it can resume, and storage dirs of another user or
writable by others."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import trio

from actors.download import DownloadRequest, download_file
from actors.partial import Sidecar, held_marker, partial_path, sidecar_path, write_sidecar
from actors.safe_files import UnsafeFile, open_own, touch_new
from actors.store import Store, StoreError
from tests.actors.test_download import Sink
from tests.origin import open_origin

SECRET = b"precious outside file\n"


def outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside.txt"
    target.write_bytes(SECRET)
    return target


def test_a_link_at_the_sidecar_temp_is_replaced_not_followed(tmp_path: Path) -> None:
    target = outside(tmp_path)
    dest = tmp_path / "models" / "m.gguf"
    dest.parent.mkdir()
    tmp = sidecar_path(dest).with_name(sidecar_path(dest).name + ".tmp")
    tmp.symlink_to(target)
    write_sidecar(dest, Sidecar(url="u", etag=None, last_modified=None, total=10, done=[]))
    assert SECRET == target.read_bytes()
    assert 10 == json.loads(sidecar_path(dest).read_bytes())["total"]
    assert not sidecar_path(dest).is_symlink()


def test_a_link_at_the_held_marker_is_replaced_not_followed(tmp_path: Path) -> None:
    missing = tmp_path / "created-by-the-daemon"
    dest = tmp_path / "m.gguf"
    held_marker(dest).symlink_to(missing)
    touch_new(held_marker(dest))
    assert not missing.exists()  # Path.touch would have created the link's target
    assert held_marker(dest).is_file() and not held_marker(dest).is_symlink()


def test_open_own_refuses_links_and_hard_links(tmp_path: Path) -> None:
    target = outside(tmp_path)
    (tmp_path / "soft").symlink_to(target)
    os.link(target, tmp_path / "hard")
    for name in ("soft", "hard"):
        with pytest.raises(UnsafeFile):
            os.close(open_own(tmp_path / name))
    assert SECRET == target.read_bytes()


async def test_a_hard_linked_partial_is_not_resumed_into_its_target(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(300_000)
    dest = tmp_path / "models" / "m.gguf"
    dest.parent.mkdir()
    target = tmp_path / "outside.bin"
    target.write_bytes(b"\0" * len(data))  # looks like a preallocated partial
    with trio.fail_after(30):
        async with open_origin() as origin:
            origin.add("/m", data)
            os.link(target, partial_path(dest))
            # A sidecar that says the first 1000 bytes are done and the rest can resume.
            write_sidecar(dest, Sidecar(url=origin.url("/m"), etag=origin.resources["/m"].etag,
                                        last_modified=None, total=len(data), done=[(0, 1000)]))
            req = DownloadRequest(origin.url("/m"), dest, allow_http=True, connections=1,
                                  sha256=hashlib.sha256(data).hexdigest())
            await download_file(req, Sink())
    assert data == dest.read_bytes()
    assert b"\0" * len(data) == target.read_bytes()  # never written through the hard link
    assert 1 == os.stat(dest).st_nlink


def test_storage_dirs_of_another_user_or_writable_by_others_are_refused(
        tmp_path: Path) -> None:
    root = tmp_path / "storage"
    Store.open(root)  # made by modeld: fine
    (root / "models").chmod(0o777)
    with pytest.raises(StoreError, match=r"writable by other users.*chmod go-w"):
        Store.open(root)
    (root / "models").chmod(0o700)
    if os.geteuid() == 0:  # only root can give a directory away
        os.chown(root / "custom", 12345, 12345)
        with pytest.raises(StoreError, match="belongs to uid 12345"):
            Store.open(root)
        os.chown(root / "custom", 0, 0)
    # Models moved to a bigger disk through a link: followed, and held to the same rule.
    bigger = tmp_path / "bigger"
    bigger.mkdir(mode=0o700)
    (root / "models").rmdir()
    (root / "models").symlink_to(bigger)
    Store.open(root)
    bigger.chmod(0o757)
    with pytest.raises(StoreError, match="writable by other users"):
        Store.open(root)
