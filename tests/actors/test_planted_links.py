"""Links planted in the storage dir by someone else are never followed (issue 18, item 3): a
symlink at the sidecar's temp name, a symlink at the held marker's name, a hard link at the
partial's name with a sidecar that says it can resume, and storage dirs of another user or
writable by others."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path

import attrs
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


def test_sidecar_temps_are_unique_and_a_crashed_one_is_cleaned(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "storage")
    dest = store.model_path("m")
    write_sidecar(dest, Sidecar(url="u", etag=None, last_modified=None, total=10, done=[]))
    assert ["m.gguf.partial.json"] == sorted(p.name for p in dest.parent.iterdir())
    crashed = dest.parent / ".m.gguf.partial.json.k2j4h5g6.tmp"  # a crash between write and rename
    crashed.write_bytes(b"{")
    other = dest.parent / ".mm.gguf.partial.json.k2j4h5g6.tmp"
    other.write_bytes(b"{")
    store.delete_model_files("m")
    assert [other.name] == [p.name for p in dest.parent.iterdir()]  # only m's, not mm's
    Store.open(store.root)
    assert [] == list(dest.parent.iterdir())  # and every temp at start


def test_records_and_pins_are_read_only_as_regular_files(tmp_path: Path) -> None:
    from actors.spec import ModelSpec
    from supervisor.pins import apply_pins, pin_path, write_pin

    store = Store.open(tmp_path / "storage")
    spec = ModelSpec(id="real", name="real", custom=True)
    store.write_record(spec)
    # A link to a well-formed record elsewhere, and a FIFO that would block a plain open.
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(store.record_path("real").read_bytes().replace(b'"real"', b'"linked"'))
    store.record_path("linked").symlink_to(elsewhere)
    os.mkfifo(store.record_path("fifo"))
    loaded: list[list[str]] = []
    reader = threading.Thread(target=lambda: loaded.append(
        [s.id for s in store.load_records()]), daemon=True)
    reader.start()
    reader.join(10)
    assert [["real"]] == loaded  # neither followed nor waited on
    # A pin planted as a link is not applied.
    pinned = ModelSpec(id="cat", name="cat", source="hf.co/o/r:Q4_K_M", url="https://x/y.gguf",
                       sha256="a" * 64, size=5, revision="c" * 40, file="y-Q4_K_M.gguf")
    write_pin(store.root, pinned)
    os.replace(pin_path(store.root, "cat"), elsewhere)
    pin_path(store.root, "cat").symlink_to(elsewhere)
    catalog = attrs.evolve(pinned, url=None, sha256=None, size=None, revision=None, file=None)
    assert [catalog] == apply_pins(store.root, [catalog])
    pin_path(store.root, "cat").unlink()
    os.replace(elsewhere, pin_path(store.root, "cat"))
    assert pinned.url == apply_pins(store.root, [catalog])[0].url  # the real pin: applied


def test_a_models_link_to_nothing_or_a_file_in_its_place_is_a_clear_error(
        tmp_path: Path) -> None:
    root = tmp_path / "storage"
    root.mkdir(mode=0o700)
    (root / "models").symlink_to(tmp_path / "unmounted" / "models")
    with pytest.raises(StoreError, match=r"models is a link to .*unmounted/models, which is "
                       r"not a directory.*set \[storage\] dir"):
        Store.open(root)
    (root / "models").unlink()
    (root / "models").write_bytes(b"")
    with pytest.raises(StoreError, match=r"models is not a directory"):
        Store.open(root)
