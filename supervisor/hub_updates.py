"""Updates of models backed by a Hub reference (`source`), and the check behind
`updateAvailable`.

An update re-resolves the model's reference (supervisor/hub.py). The same files (same sha256,
every part of a split set): nothing is downloaded ("up to date"; a newer commit holding them
becomes the pin). A new file or set: it is downloaded beside the old one, to
`<storage>/updates/<id>.gguf` (a set's parts beside that, one after the other, each resumable
and verified, with one progress over the set, as actors/model_file.py downloads a set), through
the same download as any other (its progress on the model's progress stream), and then the
actor publishes it over the old files with the new record or pin in one step
(`ImportFile(spec=...)`, actors/file_update.py: a crash leaves the old files or the new ones).
Until then the old files stay the model's, loadable, and the model stays in its state. A
cancelled update, or one whose download failed, keeps what it downloaded for the next one (which
first clears what has other names: file_update.clear_others); one whose publish was refused, or
whose model was deleted, leaves nothing.

The check runs in the background, every `[hub] update_check` (the first a minute after start,
or sooner for a shorter interval), only for downloaded models whose reference can move (not a
commit), one request per reference; never with `HF_HUB_OFFLINE` set. A failed check is logged
once (until a check succeeds again) and changes nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import structlog
import trio

from actors import file_update, split
from actors import messages as m
from actors.download import DownloadRequest, download_file
from actors.errors import Conflict, InvalidInput, ModelError
from actors.gguf import GGUF_MAGIC
from actors.keepalive import parse_keep_alive
from actors.progress import ProgressMeter
from actors.spec import ModelSpec, SplitPart
from actors.state import State, flags
from supervisor.hub import COMMIT, Resolved, pinned, resolve
from supervisor.hub_refs import BadReference, HubRef, parse_reference
from supervisor.pins import write_pin

if TYPE_CHECKING:
    from supervisor.registry import Registry

log = structlog.get_logger("modeld.hub")

FIRST_CHECK = 60.0  # seconds after start-up before the first background check (at most)
CHECK_WAIT = 60.0  # seconds one background check of one reference may take
PUBLISH_TRIES = 120  # a loading or unloading model is waited for, a second at a time
UP_TO_DATE, UPDATING, DOWNLOADING = "up to date", "updating", "downloading"


def offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _reference(spec: ModelSpec) -> HubRef | None:
    try:
        return parse_reference(spec.source or "")
    except BadReference:
        return None


class HubUpdates:
    """The updates of one registry's source-backed models (one at a time per model)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._heads: dict[str, Resolved] = {}  # a reference (canonical) -> its file now
        self._running: dict[str, trio.CancelScope] = {}
        self._discard: set[str] = set()  # updates cancelled by a delete
        self._check_failing = False

    # -- what GET shows

    def available(self, spec: ModelSpec) -> bool | None:
        """Whether the reference now names another file than the pinned one (for a split set,
        any part another) (None: not known, or not a source-backed model)."""
        ref = _reference(spec) if spec.source and spec.revision else None
        head = None if ref is None else self._heads.get(ref.canonical())
        if head is None:
            return None
        return not _same_bytes(spec, head)

    # -- an update asked for

    async def update(self, model_id: str) -> tuple[m.ModelView, str]:
        """Re-resolve the model's source: ("up to date" | "updating" | "downloading").
        Raises InvalidInput (no source; the Hub's 4xx), Unavailable (the Hub cannot be
        reached); the caller bounds the wait."""
        registry = self._registry
        view = registry.view(model_id)
        spec = view.spec
        ref = _reference(spec)
        if spec.source is None or ref is None:
            raise InvalidInput(f"{model_id} has no Hub source to update from; `update` is for "
                               "models made from an hf.co/... reference", code="no_source")
        if model_id in self._running:
            return view, UPDATING
        if view.state is State.DOWNLOADING:
            return view, DOWNLOADING
        resolved = await resolve(ref, registry.hub.endpoint, registry.hub.token)
        self._heads[ref.canonical()] = resolved
        if view.state is State.ABSENT:  # nothing to keep: pinned to the newest, downloaded
            await self._repin(model_id, resolved, same_file=False)
            return await registry.call(model_id, lambda r: m.StartDownload(reply=r)), DOWNLOADING
        if _same_bytes(spec, resolved):
            if resolved.commit != spec.revision:  # the same bytes at a newer commit
                view = await self._repin(model_id, resolved, same_file=True)
            return view, UP_TO_DATE
        if model_id in self._running:  # another update started while the Hub answered
            return registry.view(model_id), UPDATING
        if not await trio.to_thread.run_sync(file_update.one_file_system, registry.store):
            raise Conflict(f"{model_id} cannot be updated here: {file_update.CROSS_DEVICE}",
                           code="update_unsupported")
        scope = self._running[model_id] = trio.CancelScope()
        registry.broadcaster(model_id).publish(m.Progress(
            model=model_id, status="INITIALIZED", total=resolved.size))
        log.info("hub_update_started", model=model_id, revision=resolved.commit,
                 file=resolved.file, bytes=resolved.size, parts=len(resolved.parts) or 1)
        registry.start_soon(self._download, model_id, pinned(spec, resolved), scope)
        return registry.view(model_id), UPDATING

    def running(self, model_id: str) -> bool:
        """Whether an update of `model_id` is resolving its file or downloading it."""
        return model_id in self._running

    def cancel(self, model_id: str, *, discard: bool = False) -> bool:
        """Cancel a running update: what it downloaded is kept for the next one, or removed
        with `discard` (the model is being deleted)."""
        scope = self._running.get(model_id)
        if scope is not None:
            if discard:
                self._discard.add(model_id)
            scope.cancel()
        return scope is not None

    async def _repin(self, model_id: str, resolved: Resolved, *, same_file: bool) -> m.ModelView:
        def change(current: ModelSpec) -> ModelSpec:
            if same_file and not _same_bytes(current, resolved):
                return current  # changed meanwhile
            return pinned(current, resolved)

        view = await self._registry.call(model_id, lambda r: m.UpdateSpec(reply=r, change=change))
        await self._keep_pin(view.spec)
        return view

    async def _keep_pin(self, spec: ModelSpec) -> None:
        if not spec.custom:  # a catalog model's pin lives in pins/<id>.json
            await trio.to_thread.run_sync(write_pin, self._registry.store.root, spec)

    async def _download(self, model_id: str, spec: ModelSpec, scope: trio.CancelScope) -> None:
        registry = self._registry
        out = registry.broadcaster(model_id)
        total = spec.size or 0  # a split set's: the whole set's
        try:
            with scope:
                def queued(place: int) -> None:  # it waits for one of [download] max_active
                    out.publish(m.Progress(model=model_id, status="INITIALIZED", total=total,
                                           queue_position=place))

                async with registry.downloads.slot(queued):
                    await self._fetch(model_id, spec)
                # Once asked, the actor publishes whatever a cancel says: the answer is waited
                # for, so that what is reported is what happened.
                with trio.CancelScope(shield=True):
                    try:
                        await self._publish(model_id, spec)  # with the new record or pin
                    except ModelError as exc:
                        # Refused (a bad file, the model deleted): its files go. Not after the
                        # journal (`update_unfinished`): start-up finishes that publish.
                        if exc.code not in ("conflict", "update_unfinished"):
                            self._discard.add(model_id)
                        raise
            if scope.cancelled_caught:
                out.publish(m.Progress(model=model_id, status="CANCELED"))
                log.info("hub_update_cancelled", model=model_id)
                return
            out.publish(m.Progress(model=model_id, status="COMPLETED", percentage=100.0,
                                   bytes=total, total=total))
            log.info("hub_updated", model=model_id, revision=spec.revision, file=spec.file)
        except Exception as exc:  # a bug or an unforeseen library error fails the update,
            # never the registry (as a download's does)
            reason = f"the update to {spec.file} at {spec.revision} failed: {exc}"
            out.publish(m.Progress(model=model_id, status="FAILED", error=reason))
            log.error("hub_update_failed", model=model_id, reason=reason,
                      code=getattr(exc, "code", "update_failed"))
        finally:
            del self._running[model_id]
            if model_id in self._discard:  # deleted or refused: nothing of the update stays
                self._discard.discard(model_id)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(file_update.discard, registry.store, spec)

    async def _fetch(self, model_id: str, spec: ModelSpec) -> None:
        """Download the new file, or each part of the new set (one progress over the set; a
        part already verified in `updates/` is kept), to `updates/`."""
        registry, config = self._registry, self._registry.config
        store = registry.store
        dest = file_update.staged_base(store, model_id)
        assert spec.url is not None and spec.sha256 is not None
        template = DownloadRequest(
            url=spec.url, dest=dest, sha256=spec.sha256, size=spec.size,
            connections=config.download.connections, retries=config.download.retries,
            stall_timeout=config.download.stall_timeout, allow_http=config.download.allow_http,
            allow_private=config.download.allow_private, min_rate=config.download.min_rate,
            min_free=config.storage.min_free, magic=GGUF_MAGIC,
            headers=registry.hub.headers_for(spec.url))
        await trio.to_thread.run_sync(file_update.clear_others, store, spec)
        meter = ProgressMeter(model_id, registry.broadcaster(model_id),
                              retries=config.download.retries)
        if not spec.parts:
            await download_file(template, meter)
            return
        await split.fetch_parts(store, spec, template, meter, download_file, dest)

    async def _publish(self, model_id: str, spec: ModelSpec) -> m.ModelView:
        """The actor publishes the verified files and takes the new record or pin in one step;
        a model in the middle of a load or unload is waited for."""
        assert spec.sha256 is not None
        sha256, first = spec.sha256, file_update.staged_paths(self._registry.store, spec)[0]
        for _ in range(PUBLISH_TRIES):
            try:
                return await self._registry.call(model_id, lambda r: m.ImportFile(
                    reply=r, temp=first, sha256=sha256, spec=spec))
            except Conflict as exc:
                if exc.code != "conflict":
                    raise
            await trio.sleep(1.0)
        raise Conflict(f"{model_id} stayed busy loading or unloading; the update was not "
                       "published", code="conflict")

    # -- the background check

    async def watch(self) -> None:
        """Check every `[hub] update_check`, until cancelled."""
        interval = parse_keep_alive(self._registry.config.hub.update_check)
        if interval <= 0 or offline():
            return
        await trio.sleep(min(interval, FIRST_CHECK))
        while True:
            await self.check()
            await trio.sleep(interval)

    async def check(self) -> None:
        """One round: each movable reference of a downloaded model, resolved once."""
        registry, done = self._registry, set()
        for view in registry.views():
            spec = view.spec
            ref = _reference(spec) if spec.source and spec.revision else None
            if (ref is None or not flags(view.state).downloaded
                    or (ref.revision is not None and COMMIT.fullmatch(ref.revision))
                    or ref.canonical() in done):
                continue
            done.add(ref.canonical())
            try:
                with trio.fail_after(CHECK_WAIT):
                    head = await resolve(ref, registry.hub.endpoint, registry.hub.token)
            except (ModelError, trio.TooSlowError) as exc:
                if not self._check_failing:
                    log.info("hub_check_failed", source=ref.canonical(),
                             reason=str(exc) or "the Hub did not answer in time")
                self._check_failing = True
                continue
            self._check_failing = False
            self._heads[ref.canonical()] = head


def _same_bytes(spec: ModelSpec, resolved: Resolved) -> bool:
    """Whether `resolved` names the files `spec` is pinned to (every part of a split set)."""
    def files(parts: tuple[SplitPart, ...]) -> list[tuple[str, str]]:
        return [(p.file, p.sha256) for p in parts]
    return ((spec.sha256, spec.file) == (resolved.sha256, resolved.file)
            and files(spec.parts) == files(resolved.parts))
