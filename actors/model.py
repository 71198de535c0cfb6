"""ModelActor: one model, one mailbox, one writer of its state.

The actor loop is the only code that changes `state`. Long work (a download, a worker start)
runs as a task in the actor's own nursery, inside its own cancel scope, and reports its end
as a message in the same mailbox; the loop alone then moves the state.
"""

from __future__ import annotations

from typing import Any, TypeVar

import structlog
import trio

from actors import messages as m
from actors import split
from actors.actor_core import ActorSettings, Message
from actors.attempts import DownloadEnded, FactsRead, LoadAttempt, LoadEnded, WorkerExited
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
from actors.gguf import ArchitectureUnsupported, GGUFInvalid
from actors.keepalive import DEFAULT, Expired, show_keep_alive, watch_expiry
from actors.load_checks import facts_from, memory_need, read_facts, runtime_spec
from actors.model_file import FileCommands
from actors.partial import held_marker
from actors.ports import WorkerHandle
from actors.state import Event, State
from actors.worker import WorkerError

__all__ = ["ActorSettings", "ModelActor"]

log = structlog.get_logger("modeld.actor")

T = TypeVar("T")
UNLOAD_GRACE = 3.0  # seconds a worker gets to exit when asked, before it is killed
STOP_BOUND = UNLOAD_GRACE + 5.0  # the most a worker's stop may take, reaping included


def _reply_now(reply: trio.MemorySendChannel[T], value: T) -> None:
    """Answer without waiting; a caller that gave up already just misses the answer."""
    try:
        reply.send_nowait(value)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    reply.close()


class ModelActor(FileCommands):
    """The actor: its loop, its commands, and loading and unloading its worker. Its state and
    view are in actors/actor_core.py, getting its file in actors/model_file.py."""

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
                nursery.start_soon(watch_expiry, self._keep, self._report_expiry)
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

    async def _report_expiry(self) -> None:
        await self._send.send(Expired())

    async def _expire(self) -> None:
        """The keep-alive ran out; unload unless the model is in use again (or was already
        unloaded)."""
        if self.state is State.LOADED and self._keep.due(trio.current_time()):
            log.info("model_expired", model=self.spec.id,
                     keep_alive=show_keep_alive(self._keep.duration))
            await self._unload()

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
        if await trio.to_thread.run_sync(split.published, self._store, self.spec):
            self.state = State.DOWNLOADED  # its facts come later (_read_facts_later)
            self._publish(status="COMPLETED", percentage=100.0)
            return False
        self._partial = await trio.to_thread.run_sync(split.done_bytes, self._store, self.spec)
        held = await trio.to_thread.run_sync(held_marker(dest).exists)
        return self._partial > 0 and not held and self.spec.url is not None

    async def _read_facts_later(self) -> None:
        """Start-up never waits on a file's header (an untrusted one may take its time): the
        facts of the file found on disk arrive in the mailbox once read."""
        facts = await trio.to_thread.run_sync(read_facts, self._inspect, self.dest,
                                              self.spec.id, abandon_on_cancel=True)
        await self._send.send(FactsRead(split.whole_set(facts, self.spec)))

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
        elif isinstance(msg, Expired):
            await self._expire()
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
            return await self._handle_download()
        if isinstance(cmd, m.CancelDownload):
            return await self._handle_cancel()
        if isinstance(cmd, m.Unload):
            if cmd.if_idle and self.state is State.LOADED and self._keep.busy:
                raise Conflict("the model is in use", code="busy")
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
            return await self._handle_import(cmd.temp, cmd.sha256, cmd.spec)
        if isinstance(cmd, m.Delete):
            return await self._handle_delete()
        raise InvalidInput(f"unknown command {type(cmd).__name__}")

    # -- load / unload ---------------------------------------------------------------------

    def _handle_load(self, cmd: m.Load) -> None:
        if self.state is State.LOADED:
            self._gate.touch(self.spec.id)
            if cmd.keep_alive is not DEFAULT:
                self._keep.set_duration(self._keep_for(cmd.keep_alive))
            _reply_now(cmd.reply, self.view())
        elif self.state is State.LOADING:
            assert self._load is not None
            if cmd.keep_alive is not DEFAULT:
                self._load_keep = cmd.keep_alive
            self._load.waiters.append(cmd.reply)
        elif self.state is State.DOWNLOADED:
            assert self._nursery is not None
            attempt = LoadAttempt(
                scope=trio.CancelScope(), ended=trio.Event(), waiters=[cmd.reply]
            )
            self._load = attempt
            self._load_keep = cmd.keep_alive
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
            stream = GenerationStream(self.spec.id, worker.generate(cmd.prompt, cmd.params),
                                      on_close=self._keep.lend(cmd.keep_alive))
            _reply_now(cmd.reply, stream)

    def _handle_embed(self, cmd: m.Embed) -> None:
        worker = self._loaded_worker(cmd.reply)
        if worker is not None:
            _reply_now(cmd.reply, EmbeddingJob(self.spec.id, worker.embed, cmd.texts,
                                               on_done=self._keep.lend(cmd.keep_alive)))

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
                attempt.facts = facts = split.whole_set(facts_from(info), self.spec)
                assert facts is not None
                # The runtime is chosen (or refused) before anything is evicted for the model.
                spec = runtime_spec(self.spec, info, self._settings.default_runtime,
                                    self._settings.parallel)
                # The catalog's `ram`, when it says more than the header's estimate, wins.
                need = memory_need(spec, attempt.facts, spec.runtime, self._settings.parallel)
                await self._gate.admit(self.spec.id,
                                       max(need or facts.size, self.spec.ram or 0))
                admitted = True
                spawned_at = trio.current_time()
                attempt.worker = await self._spawn(self.dest, spec, info.chat_template)
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
            self._keep.start(self._keep_for(self._load_keep), trio.current_time())
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
        self._keep.stop()
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
        self._keep.stop()
        await worker.aclose(UNLOAD_GRACE)
        self._gate.release(self.spec.id)
        self._load_seconds = None
        log.info("model_unloaded", model=self.spec.id, pid=worker.pid)

    async def _handle_delete(self) -> m.ModelView:
        if self._download is not None:
            attempt = self._download
            attempt.scope.cancel()
            await attempt.ended.wait()
            self._download = None
            self._move(Event.DOWNLOAD_CANCELLED)
        await self._unload()
        await trio.to_thread.run_sync(split.delete_files, self._store, self.spec)
        self._partial = 0
        self._facts = None
        self.error = None
        if self.state is not State.ABSENT:
            self._move(Event.DELETE)
        self._publish()
        log.info("model_files_deleted", model=self.spec.id)
        return self.view()
