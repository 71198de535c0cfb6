"""How a model gets its file: download (start, end, cancel) and import of an uploaded file.
Part of the actor (actors/model.py); these run in its loop or its nursery."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import attrs
import structlog
import trio

from actors import file_update, split
from actors import messages as m
from actors.actor_core import ActorCore
from actors.attempts import DownloadAttempt, DownloadEnded
from actors.disk import check_fits
from actors.download import DiskFull, DownloadError, DownloadRequest
from actors.errors import Conflict, InvalidInput, OperationFailed
from actors.gguf import GGUF_MAGIC, GGUFInfo, GGUFInvalid
from actors.load_checks import facts_from
from actors.partial import held_marker, remove_partial
from actors.progress import ProgressMeter
from actors.safe_files import touch_new
from actors.spec import ModelSpec
from actors.state import Event, State

log = structlog.get_logger("modeld.actor")


class FileCommands(ActorCore):
    """The commands that give a model its file; ModelActor's loop calls them."""

    # -- download --------------------------------------------------------------------------

    async def _handle_download(self) -> m.ModelView:
        if self.state is State.ABSENT:
            if self.spec.url is None:
                raise Conflict(
                    "this model has no url to download from; set one with /model/update "
                    "or import its file",
                    code="no_url",
                )
            if self.spec.size is not None:  # refused before any byte when it cannot fit
                free = await trio.to_thread.run_sync(self._free_space, self.dest.parent)
                check_fits(self.spec.size - self._partial, free, "the download",
                           self._settings.min_free)
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
        self._publish_start(queue_position=None)
        request = DownloadRequest(
            url=self.spec.url,
            dest=self.dest,
            sha256=self.spec.sha256,
            size=self.spec.size,
            connections=self._settings.connections,
            retries=self._settings.retries,
            stall_timeout=self._settings.stall_timeout,
            allow_http=self._settings.allow_http,
            allow_private=self._settings.allow_private,
            min_rate=self._settings.min_rate,
            min_free=self._settings.min_free,
            # One rule for downloads and imports: the file must pass `inspect`.
            magic=GGUF_MAGIC,
            verify=self._inspect,
            headers=self._settings.headers_for(self.spec.url),
        )
        self._nursery.start_soon(self._run_download, attempt, request)

    def _publish_start(self, *, queue_position: int | None) -> None:
        """INITIALIZED: the download is asked for; with its place while it waits in line
        ([download] max_active)."""
        self._publish(status="INITIALIZED", bytes=self._partial, total=self.spec.size,
                      percentage=self.progress.value.percentage if self._partial else 0.0,
                      queue_position=queue_position)

    def _queued(self, place: int) -> None:
        self._publish_start(queue_position=place)
        log.info("download_queued", model=self.spec.id, place=place)

    async def _run_download(self, attempt: DownloadAttempt, request: DownloadRequest) -> None:
        try:
            if attempt.previous is not None:
                # The last attempt may still be unwinding; it must not write into our partial.
                await attempt.previous.wait()
            await trio.to_thread.run_sync(
                lambda: held_marker(request.dest).unlink(missing_ok=True)
            )
            with attempt.scope:
                async with self._downloads.slot(self._queued):
                    if self.progress.value.queue_position is not None:  # its turn now
                        self._publish_start(queue_position=None)
                    meter = ProgressMeter(self.spec.id, self.progress,
                                          retries=self._settings.retries)
                    if not self.spec.parts:
                        await self._fetch(request, meter)
                    else:
                        await split.fetch_parts(self._store, self.spec, request, meter,
                                                self._fetch)
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
        if await trio.to_thread.run_sync(split.published, self._store, self.spec):
            self._partial = 0
            self._move(Event.DOWNLOAD_DONE)
            await self._refresh_facts()
            size = self._facts.size if self._facts else 0
            if self.spec.parts:
                size = sum(p.size for p in self.spec.parts)
            self._publish(status="COMPLETED", percentage=100.0, bytes=size, total=size)
            log.info("download_completed", model=self.spec.id, bytes=size)
            return
        await trio.to_thread.run_sync(touch_new, held_marker(dest))
        self._partial = await trio.to_thread.run_sync(split.done_bytes, self._store, self.spec)
        last = self.progress.value
        if attempt.error is not None:
            self.error = str(attempt.error)
            if isinstance(attempt.error, DiskFull) and self._partial > 0:
                self.error += f" (the {self._partial} bytes done are kept: it resumes from there)"
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

    # -- files -----------------------------------------------------------------------------

    async def _handle_import(self, temp: Path, sha256: str,
                             update: ModelSpec | None = None) -> m.ModelView:
        if update is not None:
            # The new pin over the record as it is now: edits made while the update
            # downloaded (name, description, runtime, ...) stay.
            pinned = attrs.evolve(
                self.spec, url=update.url, sha256=update.sha256, size=update.size,
                source=update.source, revision=update.revision, file=update.file,
                parts=update.parts, quantization=self.spec.quantization or update.quantization)
            return await self._handle_update(temp, sha256, pinned)
        try:
            if self.spec.parts:
                raise Conflict("this model is a split GGUF set; download it (an upload is one "
                               "file)", code="split_import_unsupported")
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
            info = await self._checked(temp)
            try:
                await trio.to_thread.run_sync(self._publish_import, temp)
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
        self._published()
        await self._remember_sha256(sha256)
        self._publish(status="COMPLETED", percentage=100.0, bytes=info.file_size,
                      total=info.file_size)
        log.info("model_imported", model=self.spec.id, bytes=info.file_size)
        return self.view()

    async def _handle_update(self, temp: Path, sha256: str, update: ModelSpec) -> m.ModelView:
        """A Hub update (supervisor/hub_updates.py): its file or split set, verified in
        `updates/`, replaces the files of a downloaded or loaded model together with the new
        record or pin (actors/file_update.py); a loaded model goes on with the old files, which
        it holds open. One deleted meanwhile stays deleted."""
        if self.state is State.ABSENT:
            raise Conflict("the model's files were deleted while its update downloaded; "
                           "nothing was published", code="not_downloaded")
        if self.state not in (State.DOWNLOADED, State.LOADED):
            raise Conflict(f"cannot replace the files while the model is {self.state.value}",
                           code="conflict")
        if (temp, sha256) != (file_update.staged_paths(self._store, update)[0], update.sha256):
            raise InvalidInput(f"{temp.name} with sha256 {sha256} is not the first file of the "
                               "update, verified", code="checksum_mismatch")
        info = await self._checked(temp)
        try:
            await trio.to_thread.run_sync(file_update.publish, self._store, self.spec, update,
                                          self._keep_spec)
        except file_update.UpdateLost as exc:
            raise OperationFailed(f"the update could not be published: {exc}",
                                  code="update_failed") from None
        except OSError as exc:  # after the journal: start-up finishes the publish
            log.error("hub_update_unfinished", model=self.spec.id,
                      reason=exc.strerror or str(exc))
            raise OperationFailed(
                f"the update's files could not all be published ({exc.strerror or exc}); "
                "modeld finishes the publish when it starts next", code="update_unfinished",
            ) from None
        self.spec = update
        self._facts = split.whole_set(facts_from(info), update)
        self._published()
        size = sum(p.size for p in update.parts) if update.parts else info.file_size
        self._publish(status="COMPLETED", percentage=100.0, bytes=size, total=size)
        log.info("model_imported", model=self.spec.id, bytes=size)
        return self.view()

    async def _checked(self, path: Path) -> GGUFInfo:
        """The file at `path` passes `inspect` (one rule for downloads and imports)."""
        try:
            return await trio.to_thread.run_sync(self._inspect, path)
        except GGUFInvalid as exc:
            raise InvalidInput(
                f"the file is not a loadable GGUF file: {exc}", code="model_file_invalid"
            ) from None
        except OSError as exc:
            raise OperationFailed(
                f"the file could not be read: {exc.strerror or exc}", code="import_failed",
            ) from None

    def _published(self) -> None:
        """The model's file is now here: downloaded (a loaded model stays loaded)."""
        self._partial = 0
        self.error = None
        if self.state is not State.LOADED:
            self._move(Event.FILE_IMPORTED)

    def _keep_spec(self, spec: ModelSpec) -> None:
        """Write `spec`'s record (a custom model) or pin (a catalog model); blocking."""
        if spec.custom:
            self._store.write_record(spec)
        else:
            self._settings.write_pin(spec)

    async def _remember_sha256(self, sha256: str) -> None:
        """Record the imported file's sha256 (clients find a file imported before by it)."""
        if self.spec.custom and self.spec.sha256 != sha256:
            await self._adopt(attrs.evolve(self.spec, sha256=sha256))

    async def _adopt(self, spec: ModelSpec) -> None:
        """Take `spec` for the published file, and record it (a custom model's record; a
        catalog model's spec is the config's, and its pin the caller's business)."""
        if spec.custom:
            try:
                await trio.to_thread.run_sync(self._store.write_record, spec)
            except OSError as exc:  # the file is published all the same; the record is old
                log.warning("record_not_written", model=self.spec.id,
                            reason=exc.strerror or str(exc))
        self.spec = spec

    def _publish_import(self, temp: Path) -> None:
        """Publish an uploaded file; an earlier download's partial is no longer needed."""
        self._store.publish(temp, self.spec.id)
        remove_partial(self.dest)
        held_marker(self.dest).unlink(missing_ok=True)
