"""Request bodies as they arrive, and uploads stored from them: written and hashed in
threads while the next chunks arrive, refused within their first MiB when no runtime runs
their architecture (PUT /model/{id}/file)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import trio
from quart import current_app, request
from werkzeug.exceptions import RequestTimeout

from actors.errors import InsufficientMemory, InvalidInput, OperationFailed
from actors.gguf import architecture_from_prefix, unrunnable_message
from actors.runtimes import runnable
from actors.safe_files import open_own
from actors.writeback import WRITEBACK_EVERY, start_writeback
from supervisor.api.app import READ_TIMEOUT

FILE_CHUNK = 4 * 1024 * 1024  # bytes of an upload written per call in a thread
IOV_MAX = 1024  # buffers per writev(2)
PREFIX_BYTES = 1024 * 1024  # an upload's architecture is checked within this many bytes


async def body_chunks() -> AsyncIterator[bytes]:
    """The request body as it arrives; 408 (and the connection closed) when it stalls for
    `[server] read_timeout` seconds: a client that never sends its body holds nothing."""
    stall = current_app.config[READ_TIMEOUT]
    chunks = aiter(request.body)
    while True:
        chunk: bytes | None = None
        with trio.move_on_after(stall):
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
        if chunk is None:
            raise RequestTimeout(f"the request body stalled for {stall:g} s")
        yield chunk


@contextlib.contextmanager
def disk_errors_reported() -> Iterator[None]:
    """OSError while storing an upload: 507 disk_full when out of space, else 500 disk_error."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientMemory(
                "no space left in the storage dir for this file; free some space and retry",
                code="disk_full",
            ) from None
        raise OperationFailed(
            f"cannot store the file: {exc.strerror or exc}", code="disk_error"
        ) from None


def _check_prefix(prefix: bytes) -> None:
    """Refuse, from its first bytes, a file whose architecture no runtime runs."""
    architecture = architecture_from_prefix(prefix)
    if architecture is not None and not runnable(architecture):
        raise InvalidInput(unrunnable_message(architecture), code="model_file_invalid")


class FileSink:
    """An upload's bytes on their way to the disk (blocking; called in threads): written as
    they came, without joining them first; hashed beside the write, in another thread; handed
    to the disk every WRITEBACK_EVERY bytes, so that the fsync before publishing finds little
    left to write."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pos, self.handed = fd, 0, 0
        self.hasher = hashlib.sha256()

    def hash(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.hasher.update(chunk)

    def write(self, chunks: list[bytes]) -> None:
        views = [memoryview(c) for c in chunks]
        while views:
            written = os.writev(self.fd, views[:IOV_MAX])
            self.pos += written
            while views and written >= len(views[0]):
                written -= len(views.pop(0))
            if written:
                views[0] = views[0][written:]
        if self.pos - self.handed >= WRITEBACK_EVERY:
            start_writeback(self.fd, self.handed, self.pos - self.handed)
            self.handed = self.pos


async def receive_file(temp: Path) -> str:
    """Stream the request body into `temp` and return its sha256. Batches of FILE_CHUNK bytes
    are written and hashed in a thread while the next batch arrives (so the body is taken from
    the server as it comes, never piling up). A file whose architecture no runtime runs is
    refused (400) within its first MiB."""
    fd = await trio.to_thread.run_sync(
        lambda: open_own(temp, os.O_WRONLY | os.O_TRUNC, create=False))
    sink = FileSink(fd)
    send, receive = trio.open_memory_channel[list[bytes]](1)

    async def write_batches() -> None:
        async with receive:
            async for batch in receive:
                # Hashed and written at once, in two threads (both let go of the GIL): the
                # page-cache copy alone takes as long as the hash.
                async with trio.open_nursery() as both:
                    both.start_soon(trio.to_thread.run_sync, sink.hash, batch)
                    await trio.to_thread.run_sync(sink.write, batch)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_batches)
            async with send:
                head: bytearray | None = bytearray()  # the first PREFIX_BYTES, until checked
                batch: list[bytes] = []
                batched = 0
                async for chunk in body_chunks():
                    if head is not None:
                        head += chunk[: PREFIX_BYTES - len(head)]
                        if len(head) >= PREFIX_BYTES:
                            _check_prefix(bytes(head))
                            head = None
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= FILE_CHUNK:
                        await send.send(batch)
                        batch, batched = [], 0
                if head is not None:
                    _check_prefix(bytes(head))
                if batch:
                    await send.send(batch)
    except BaseExceptionGroup as group:
        raise _sole_error(group) from None
    finally:
        os.close(fd)
    return sink.hasher.hexdigest()


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error inside `group` (the receiving or the writing side failed; the first, should
    both have), or its Cancelled when only cancellation is inside."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    errors = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
    # One side's error (a write's OSError is told as 507/500, a refusal as 400); only
    # cancellation when cancelled from outside (the client left).
    return errors[0] if errors else leaves[0]
