"""ModelActor: one model, one mailbox, one writer of its state.

The actor loop is the only code that changes `state`. Long work (a download, a worker start)
runs as a task in the actor's own nursery, inside its own cancel scope, and reports its end
as a message in the same mailbox; the loop alone then moves the state.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import structlog
import trio

from actors import messages as m
from actors.attempts import (
    DownloadAttempt,
    DownloadEnded,
    FactsRead,
    LoadAttempt,
    LoadEnded,
    WorkerExited,
)
from actors.download import DownloadError, DownloadRequest
from actors.embedding import EmbeddingJob
from actors.errors import (
    Conflict,
    InvalidInput,
    ModelError,
    OperationFailed,
    Unavailable,
    crash_error,
)
from actors.generation import GenerationStream
from actors.gguf import GGUF_MAGIC, ArchitectureUnsupported, GGUFInfo, GGUFInvalid, inspect_gguf
from actors.load_checks import check_memory, facts_from, read_facts, runtime_spec
from actors.partial import held_marker, partial_bytes, remove_partial
from actors.ports import Fetcher, LoadGate, Spawner, WorkerHandle
from actors.progress import Broadcaster, ProgressMeter, progress_broadcaster
from actors.runtimes import preview_runtime
from actors.spec import ModelSpec
from actors.state import Event, State, transition
from actors.store import Store
from actors.worker import WorkerError

log = structlog.get_logger("modeld.actor")

T = TypeVar("T")
UNLOAD_GRACE = 3.0  # seconds a worker gets to exit when asked, before it is killed
STOP_BOUND = UNLOAD_GRACE + 5.0  # the most a worker's stop may take, reaping included
# Without a context length in the spec, a worker gets the one the file was trained with, up to
# this: the KV cache grows with it, and some files claim 32k or more.


@attrs.frozen
class ActorSettings:
    connections: int = 8
    retries: int = 6
    stall_timeout: float = 30.0
    allow_http: bool = False
    default_runtime: str = "auto"
    parallel: int = 2


def _reply_now(reply: trio.MemorySendChannel[T], value: T) -> None:
    """Answer without waiting; a caller that gave up already just misses the answer."""
    try:
        reply.send_nowait(value)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    reply.close()


Message = (m.Command | m.Generate | m.Embed | DownloadEnded | LoadEnded | WorkerExited
           | FactsRead)


class ModelActor:
    def __init__(
        self,
        spec: ModelSpec,
        store: Store,
        *,
        settings: ActorSettings,
        fetch: Fetcher,
        spawn: Spawner,
        gate: LoadGate,
        inspect: Callable[[Path], GGUFInfo] = inspect_gguf,
        progress: Broadcaster[m.Progress] | None = None,
    ) -> None:
        self.spec = spec
        self.state = State.ABSENT
        self.error: str | None = None
        # The registry hands over the model's broadcaster, which outlives any one actor: the
        # subscribers of a crashed actor's download hear the truth from the next one.
        self.progress = progress or progress_broadcaster(spec.id)
        self._store = store
        self._settings = settings
        self._fetch = fetch
        self._spawn = spawn
        self._gate = gate
        self._inspect = inspect
        self._send, self._inbox = trio.open_memory_channel[Message](64)
        self._nursery: trio.Nursery | None = None
        self._download: DownloadAttempt | None = None
        self._last_download_ended: trio.Event | None = None
        self._load: LoadAttempt | None = None
        self._worker: WorkerHandle | None = None
        self._facts: m.FileFacts | None = None
        self._partial = 0
        self._load_seconds: float | None = None

    @property
    def mailbox(self) -> trio.MemorySendChannel[Message]:
        return self._send

    @property
    def dest(self) -> Path:
        return self._store.model_path(self.spec.id)

    def view(self) -> m.ModelView:
        return m.ModelView(
            spec=self.spec,
            state=self.state,
            error=self.error,
            partial_bytes=self._partial,
            load_seconds=self._load_seconds,
            facts=self._facts,
            worker_pid=None if self._worker is None else self._worker.pid,
            runtime=self._worker.info.runtime
            if self._worker is not None
            else preview_runtime(
                self.spec.runtime or self._settings.default_runtime,
                self._facts.architecture if self._facts else None,
            ),
            slots=1 if self._worker is None else self._worker.info.parallel,
            context_length=None if self._worker is None else self._worker.info.context_length,
        )

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the mailbox until cancelled. Reads the state from disk first.

        On any exit (cancelled at shutdown, or a crash that the registry answers with a fresh
        actor) every caller is answered: the command in hand with the failure (`_dispatch`),
        queued ones and load waiters by their reply channels closing. A loaded model's worker
        is stopped on purpose, never adopted: the next actor starts from what is on disk, and
        a worker whose actor failed mid-command is in a state nobody can vouch for.
        """
        try:
            resume = await self._recover()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if resume:
                    log.info("download_resume", model=self.spec.id, bytes=self._partial)
                    self._start_download()
                if self.state is State.DOWNLOADED:
                    nursery.start_soon(self._read_facts_later)
                task_status.started()
                async for msg in self._inbox:
                    await self._dispatch(msg)
        finally:
            # Whatever ended the actor (cancellation at shutdown, a crash), nobody waits on it:
            # commands still in the mailbox get their reply channels closed (503 at once).
            self._close_waiters()
            self._close_mailbox()
            # And its workers go with it: the loaded one, and one whose load finished but was
            # not taken over yet.
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_BOUND):
                await self._stop_worker()
                if self._load is not None and self._load.worker is not None:
                    orphan, self._load.worker = self._load.worker, None
                    await orphan.aclose(UNLOAD_GRACE)
                    self._gate.release(self.spec.id)

    def _close_mailbox(self) -> None:
        self._send.close()
        while True:
            try:
                msg = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if isinstance(msg, m.Command | m.Generate | m.Embed):
                msg.reply.close()

    async def _recover(self) -> bool:
        """Set the state from disk; True when an interrupted download should resume."""
        dest = self.dest
        if await trio.to_thread.run_sync(self._store.has_model_file, self.spec.id):
            self.state = State.DOWNLOADED  # its facts come later (_read_facts_later)
            self._publish(status="COMPLETED", percentage=100.0)
            return False
        self._partial = await trio.to_thread.run_sync(partial_bytes, dest)
        held = await trio.to_thread.run_sync(held_marker(dest).exists)
        return self._partial > 0 and not held and self.spec.url is not None

    async def _read_facts_later(self) -> None:
        """Start-up never waits on a file's header (an untrusted one may take its time): the
        facts of the file found on disk arrive in the mailbox once read."""
        facts = await trio.to_thread.run_sync(read_facts, self._inspect, self.dest,
                                              self.spec.id, abandon_on_cancel=True)
        await self._send.send(FactsRead(facts))

    async def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, FactsRead):
            # Only for the file found at start: a delete, import or load since then knows better.
            if self._facts is None and self.state is State.DOWNLOADED:
                self._facts = msg.facts
        elif isinstance(msg, DownloadEnded):
            if msg.attempt is self._download:
                await self._finish_download(msg.attempt)
        elif isinstance(msg, LoadEnded):
            if msg.attempt is self._load:
                await self._finish_load(msg.attempt)
        elif isinstance(msg, WorkerExited):
            if msg.worker is self._worker:
                self._worker_died(msg.worker, msg.returncode)
        elif isinstance(msg, m.Load):
            self._handle_load(msg)
        elif isinstance(msg, m.Generate):
            self._handle_generate(msg)
        elif isinstance(msg, m.Embed):
            self._handle_embed(msg)
        else:
            try:
                reply: m.Reply = await self._handle(msg)
            except ModelError as exc:
                reply = exc
            except Exception as exc:
                # A bug or an environment failure (ENOSPC, EACCES) crashes the actor, and the
                # registry restarts it from disk; the caller in hand hears why at once.
                _reply_now(msg.reply, crash_error(msg.operation, exc))
                raise
            _reply_now(msg.reply, reply)  # a caller that gave up just misses it

    async def _handle(self, cmd: m.Command) -> m.ModelView:
        if isinstance(cmd, m.GetSnapshot):
            return self.view()
        if isinstance(cmd, m.StartDownload):
            return self._handle_download()
        if isinstance(cmd, m.CancelDownload):
            return await self._handle_cancel()
        if isinstance(cmd, m.Unload):
            await self._unload()
            return self.view()
        if isinstance(cmd, m.UpdateSpec):
            # Merged here, against the spec as it is now: concurrent updates lose nothing.
            spec = cmd.change(self.spec)
            if spec.custom:  # a catalog model's spec lives in the config (its score: in memory)
                await trio.to_thread.run_sync(self._store.write_record, spec)
            self.spec = spec
            log.info("model_updated", model=self.spec.id)
            return self.view()
        if isinstance(cmd, m.ImportFile):
            return await self._handle_import(cmd.temp, cmd.sha256)
        if isinstance(cmd, m.Delete):
            return await self._handle_delete()
        raise InvalidInput(f"unknown command {type(cmd).__name__}")

    def _move(self, event: Event) -> None:
        before = self.state
        self.state = transition(before, event)
        if self.state is not before:
            log.info(
                "state_changed",
                model=self.spec.id,
                **{"from": before.value, "to": self.state.value, "cause": event.value},
            )

    def _publish(self, **changes: object) -> None:
        """Publish a progress snapshot of this model: `m.Progress` fields, the rest defaults."""
        progress = attrs.evolve(m.Progress(model=self.spec.id), **changes)  # type: ignore[arg-type]
        self.progress.publish(progress)

    async def _refresh_facts(self) -> None:
        """Read the published file's header; a bad file is reported here and refused at load."""
        self._facts = await trio.to_thread.run_sync(read_facts, self._inspect, self.dest,
                                                    self.spec.id)

    # -- download --------------------------------------------------------------------------

    def _handle_download(self) -> m.ModelView:
        if self.state is State.ABSENT:
            if self.spec.url is None:
                raise Conflict(
                    "this model has no url to download from; set one with /model/update "
                    "or import its file",
                    code="no_url",
                )
            self._start_download()
        # Downloading: join it. Downloaded, loading or loaded: the file is already here.
        return self.view()

    def _start_download(self) -> None:
        assert self._nursery is not None
        assert self.spec.url is not None
        attempt = DownloadAttempt(
            scope=trio.CancelScope(), ended=trio.Event(), previous=self._last_download_ended
        )
        self._download = attempt
        self._last_download_ended = attempt.ended
        self.error = None
        self._move(Event.DOWNLOAD_START)
        log.info("download_started", model=self.spec.id, bytes=self._partial)
        self._publish(status="INITIALIZED", bytes=self._partial, total=self.spec.size,
                      percentage=self.progress.value.percentage if self._partial else 0.0)
        request = DownloadRequest(
            url=self.spec.url,
            dest=self.dest,
            sha256=self.spec.sha256,
            size=self.spec.size,
            connections=self._settings.connections,
            retries=self._settings.retries,
            stall_timeout=self._settings.stall_timeout,
            allow_http=self._settings.allow_http,
            # One rule for downloads and imports: the file must pass `inspect`.
            magic=GGUF_MAGIC,
            verify=self._inspect,
        )
        self._nursery.start_soon(self._run_download, attempt, request)

    async def _run_download(self, attempt: DownloadAttempt, request: DownloadRequest) -> None:
        try:
            if attempt.previous is not None:
                # The last attempt may still be unwinding; it must not write into our partial.
                await attempt.previous.wait()
            await trio.to_thread.run_sync(
                lambda: held_marker(request.dest).unlink(missing_ok=True)
            )
            with attempt.scope:
                await self._fetch(request, ProgressMeter(self.spec.id, self.progress,
                                                            retries=self._settings.retries))
        except DownloadError as exc:
            attempt.error = exc
        except Exception as exc:  # a bug or an unforeseen library error: fail, don't crash
            log.exception("download_crashed", model=self.spec.id)
            attempt.error = exc
        finally:
            attempt.ended.set()
        await self._send.send(DownloadEnded(attempt))

    async def _finish_download(self, attempt: DownloadAttempt) -> None:
        """The one place a download attempt's end moves the state, whatever ended it."""
        self._download = None
        dest = self.dest
        if await trio.to_thread.run_sync(self._store.has_model_file, self.spec.id):
            self._partial = 0
            self._move(Event.DOWNLOAD_DONE)
            await self._refresh_facts()
            size = self._facts.size if self._facts else 0
            self._publish(status="COMPLETED", percentage=100.0, bytes=size, total=size)
            log.info("download_completed", model=self.spec.id, bytes=size)
            return
        await trio.to_thread.run_sync(held_marker(dest).touch)
        self._partial = await trio.to_thread.run_sync(partial_bytes, dest)
        last = self.progress.value
        if attempt.error is not None:
            self.error = str(attempt.error)
            self._move(Event.DOWNLOAD_FAILED)
            log.error(
                "download_failed",
                model=self.spec.id,
                reason=self.error,
                code=getattr(attempt.error, "code", "download_failed"),
                bytes=self._partial,
            )
            self._publish(status="FAILED", percentage=last.percentage, bytes=self._partial,
                          total=last.total, error=self.error)
        else:
            self._move(Event.DOWNLOAD_CANCELLED)
            log.info("download_cancelled", model=self.spec.id, bytes=self._partial)
            self._publish(status="CANCELED", percentage=last.percentage, bytes=self._partial,
                          total=last.total)

    async def _handle_cancel(self) -> m.ModelView:
        attempt = self._download
        if attempt is None:
            return self.view()
        # Wait for the attempt's real end (at most one thread hop: a write, a hash step, the
        # publish): deciding earlier could call a published file absent.
        attempt.scope.cancel()
        await attempt.ended.wait()
        await self._finish_download(attempt)
        return self.view()

    # -- load / unload ---------------------------------------------------------------------

    def _handle_load(self, cmd: m.Load) -> None:
        if self.state is State.LOADED:
            self._gate.touch(self.spec.id)
            _reply_now(cmd.reply, self.view())
        elif self.state is State.LOADING:
            assert self._load is not None
            self._load.waiters.append(cmd.reply)
        elif self.state is State.DOWNLOADED:
            assert self._nursery is not None
            attempt = LoadAttempt(
                scope=trio.CancelScope(), ended=trio.Event(), waiters=[cmd.reply]
            )
            self._load = attempt
            self.error = None
            self._move(Event.LOAD_START)
            self._nursery.start_soon(self._run_load, attempt)
        else:
            why = {
                State.ABSENT: "the model is not downloaded; download it first",
                State.DOWNLOADING: "the model is still downloading; load it when it is done",
            }[self.state]
            _reply_now(cmd.reply, Conflict(why, code="not_loadable"))

    def _handle_generate(self, cmd: m.Generate) -> None:
        worker = self._loaded_worker(cmd.reply)
        if worker is not None:
            stream = GenerationStream(self.spec.id, worker.generate(cmd.prompt, cmd.params))
            _reply_now(cmd.reply, stream)

    def _handle_embed(self, cmd: m.Embed) -> None:
        worker = self._loaded_worker(cmd.reply)
        if worker is not None:
            _reply_now(cmd.reply, EmbeddingJob(self.spec.id, worker.embed, cmd.texts))

    def _loaded_worker(self, reply: trio.MemorySendChannel[Any]) -> WorkerHandle | None:
        """The worker that serves a request (and the model counts as used), or None when the
        request was refused because the model is not loaded."""
        if self.state is not State.LOADED or self._worker is None:
            why = f"the model is {self.state.value}, not loaded; load it first"
            _reply_now(reply, Conflict(why, code="not_loaded"))
            return None
        self._gate.touch(self.spec.id)
        return self._worker

    def _close_waiters(self) -> None:
        if self._load is not None:
            for waiter in self._load.waiters:
                waiter.close()
            self._load.waiters.clear()

    async def _run_load(self, attempt: LoadAttempt) -> None:
        """Check the file, make room, start the worker; the end goes to the mailbox."""
        admitted = False
        try:
            with attempt.scope:
                info = await trio.to_thread.run_sync(self._inspect, self.dest)
                attempt.facts = facts_from(info)
                # The runtime is chosen (or refused) before anything is evicted for the model.
                spec = runtime_spec(self.spec, info, self._settings.default_runtime,
                                    self._settings.parallel)
                check_memory(self.spec, info.file_size)
                await self._gate.admit(self.spec.id)
                admitted = True
                spawned_at = trio.current_time()
                attempt.worker = await self._spawn(self.dest, spec)
                attempt.seconds = trio.current_time() - spawned_at
        except ArchitectureUnsupported as exc:
            attempt.error = InvalidInput(str(exc), code="runtime_unsupported")
        except GGUFInvalid as exc:
            attempt.error = OperationFailed(
                f"the model file is not a loadable GGUF file: {exc}", code="model_file_invalid"
            )
        except WorkerError as exc:
            attempt.error = OperationFailed(f"the model failed to load: {exc}", code="load_failed")
        except OSError as exc:
            attempt.error = OperationFailed(
                f"the model file cannot be read: {exc}", code="model_file_unreadable"
            )
        except ModelError as exc:
            attempt.error = exc
        finally:
            if attempt.worker is None and admitted:
                self._gate.release(self.spec.id)
            attempt.ended.set()
        await self._send.send(LoadEnded(attempt))

    async def _finish_load(self, attempt: LoadAttempt) -> None:
        self._load = None
        if attempt.facts is not None:
            self._facts = attempt.facts
        worker = attempt.worker
        if worker is not None:
            self._worker = worker
            self._load_seconds = round(attempt.seconds, 4)
            self._move(Event.LOAD_DONE)
            log.info(
                "model_loaded",
                model=self.spec.id,
                pid=worker.pid,
                load_seconds=self._load_seconds,
                runtime_load_seconds=round(worker.info.load_seconds, 4),
                context_length=worker.info.context_length,
            )
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_worker, worker)
            result: m.Reply = self.view()
        else:
            error = attempt.error or Unavailable("the load was interrupted")
            self.error = str(error)
            self._move(Event.LOAD_FAILED)
            log.error("load_failed", model=self.spec.id, reason=self.error, code=error.code)
            result = error
        for waiter in attempt.waiters:
            _reply_now(waiter, result)

    async def _watch_worker(self, worker: WorkerHandle) -> None:
        code = await worker.wait_exited()
        await self._send.send(WorkerExited(worker, code))

    def _worker_died(self, worker: WorkerHandle, returncode: int) -> None:
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        self.error = f"the worker process stopped unexpectedly ({how})"
        self._worker = None
        self._load_seconds = None
        self._gate.release(self.spec.id)
        log.error(
            "worker_exited",
            model=self.spec.id,
            pid=worker.pid,
            returncode=returncode,
            reason=self.error,
        )
        self._move(Event.WORKER_DIED)
        # Reap it and free its pipes; it is gone already, so this does not wait.
        assert self._nursery is not None
        self._nursery.start_soon(worker.aclose, 0)

    async def _unload(self) -> None:
        if self.state is State.LOADING and self._load is not None:
            attempt = self._load
            attempt.scope.cancel()
            await attempt.ended.wait()
            if attempt.worker is not None:
                await attempt.worker.aclose(UNLOAD_GRACE)
                self._gate.release(self.spec.id)
            attempt.worker = None
            attempt.error = Conflict("the model was unloaded while it loaded", code="unloaded")
            await self._finish_load(attempt)
            self.error = None
            return
        if self.state is not State.LOADED:
            return
        self._move(Event.UNLOAD_START)
        await self._stop_worker()
        self._move(Event.UNLOAD_DONE)

    async def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        await worker.aclose(UNLOAD_GRACE)
        self._gate.release(self.spec.id)
        self._load_seconds = None
        log.info("model_unloaded", model=self.spec.id, pid=worker.pid)

    # -- files -----------------------------------------------------------------------------

    async def _handle_import(self, temp: Path, sha256: str) -> m.ModelView:
        try:
            if self.state not in (State.ABSENT, State.DOWNLOADED):
                raise Conflict(
                    f"cannot replace the file while the model is {self.state.value}",
                    code="conflict",
                )
            if self.spec.url and self.spec.sha256 not in (None, sha256):
                # Its url's file, verified by that sha256; a model without a url takes any.
                raise InvalidInput(
                    f"the file's sha256 is {sha256}; this model downloads from its url a "
                    f"file with sha256 {self.spec.sha256}: upload that file, or update the "
                    "model's url and sha256",
                    code="checksum_mismatch",
                )
            try:
                info = await trio.to_thread.run_sync(self._inspect, temp)
                await trio.to_thread.run_sync(self._publish_import, temp)
            except GGUFInvalid as exc:
                raise InvalidInput(
                    f"the file is not a loadable GGUF file: {exc}", code="model_file_invalid"
                ) from None
            except OSError as exc:  # e.g. the upload was abandoned and its file removed
                raise OperationFailed(
                    f"the uploaded file could not be published: {exc.strerror or exc}",
                    code="import_failed",
                ) from None
        finally:
            # Synchronous (an await here could be cancelled) and cheap: one unlink.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        self._facts = facts_from(info)
        self._partial = 0
        self.error = None
        self._move(Event.FILE_IMPORTED)
        await self._remember_sha256(sha256)
        self._publish(status="COMPLETED", percentage=100.0, bytes=info.file_size,
                      total=info.file_size)
        log.info("model_imported", model=self.spec.id, bytes=info.file_size)
        return self.view()

    async def _remember_sha256(self, sha256: str) -> None:
        """Record the imported file's sha256 (clients find a file imported before by it)."""
        if not self.spec.custom or self.spec.sha256 == sha256:
            return
        spec = attrs.evolve(self.spec, sha256=sha256)
        try:
            await trio.to_thread.run_sync(self._store.write_record, spec)
        except OSError as exc:  # the file is published all the same; only the hash is lost
            log.warning("record_not_written", model=self.spec.id,
                        reason=exc.strerror or str(exc))
            return
        self.spec = spec

    def _publish_import(self, temp: Path) -> None:
        """Publish an uploaded file; an earlier download's partial is no longer needed."""
        self._store.publish(temp, self.spec.id)
        remove_partial(self.dest)
        held_marker(self.dest).unlink(missing_ok=True)

    async def _handle_delete(self) -> m.ModelView:
        if self._download is not None:
            attempt = self._download
            attempt.scope.cancel()
            await attempt.ended.wait()
            self._download = None
            self._move(Event.DOWNLOAD_CANCELLED)
        await self._unload()
        await trio.to_thread.run_sync(self._store.delete_model_files, self.spec.id)
        self._partial = 0
        self._facts = None
        self.error = None
        if self.state is not State.ABSENT:
            self._move(Event.DELETE)
        self._publish()
        log.info("model_files_deleted", model=self.spec.id)
        return self.view()
