"""Models backed by a Hub reference (`source`): created pinned, and catalog ones pinned lazily.

A custom model is resolved before its record is written: the record holds the reference, the
commit and file it resolved to, and that file's url, LFS sha256 and size, so its download is
verified like any other and a later move of the branch changes nothing. A catalog entry with
a `source` is resolved when it is first downloaded (never at start-up), and keeps that pin in
`pins/<id>.json` (supervisor/pins.py), so that it stays pinned across restarts.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from actors import messages as m
from actors.errors import InvalidInput
from actors.spec import ModelSpec
from actors.state import State
from supervisor.config import Config
from supervisor.hub import pinned, resolve
from supervisor.hub_refs import BadReference, HubRef, model_id_for, parse_reference, quant_tag
from supervisor.pins import canonical_source, write_pin
from supervisor.registry import Registry
from supervisor.wire import BodyError, ModelBody, spec_from_create

RESOLVE_WAIT = 90.0  # seconds a create or download may wait for the Hub (and the actor)


def parse_source(text: str, where: str = "$.source") -> HubRef:
    try:
        return parse_reference(text)
    except BadReference as exc:
        raise InvalidInput(f"{where}: {exc}", code="invalid_reference") from None


def _same_reference(ref: HubRef, file: str) -> Callable[[ModelSpec], bool]:
    """Whether an existing model is what `ref` names: the same repository, file and revision
    asked for (a model pinned from `hf.co/u/r` is the one `hf.co/u/r:Q4_K_M` means too)."""

    def same(spec: ModelSpec) -> bool:
        if spec.source is None or spec.file != file:
            return False
        try:
            theirs = parse_reference(spec.source)
        except BadReference:
            return False
        return (theirs.repo, theirs.revision) == (ref.repo, ref.revision)

    return same


async def create_from_source(registry: Registry, config: Config, body: ModelBody) -> m.ModelView:
    """The model `body.source` names: an existing one with that reference (no request to the
    Hub: this works offline), else a new custom model, pinned, under a stable id
    (`hf-{user}-{repo}-{quant}`). Raises InvalidInput / Unavailable (hub.resolve); the
    caller bounds the wait."""
    assert body.source is not None
    if body.url is not None:
        raise BodyError("$.source: give url or source, not both")
    ref = parse_source(body.source)
    for view in registry.views():  # a catalog entry's source is as its config spells it
        if view.spec.source and canonical_source(view.spec.source) == ref.canonical():
            return view
    spec = spec_from_create(attrs.evolve(body, name=body.name or "hub", source=None), "new",
                            allow_http=config.download.allow_http)
    resolved = await resolve(ref, registry.hub.endpoint, registry.hub.token)
    if body.sha256 is not None and body.sha256 != resolved.sha256:
        raise InvalidInput(f"$.sha256: the Hub's {resolved.file} at {resolved.commit} has "
                           f"sha256 {resolved.sha256}, not {body.sha256}",
                           code="hub_sha256_mismatch")
    if body.name is None:
        what = quant_tag(resolved.file) or resolved.file.rsplit("/", 1)[-1]
        spec = attrs.evolve(spec, name=f"{ref.repo.split('/', 1)[1]} {what}")
    ids = (model_id_for(ref.repo, resolved.file),
           model_id_for(ref.repo, resolved.file, ref.canonical()))
    return await registry.create(pinned(spec, resolved), ids=ids,
                                 reuse=_same_reference(ref, resolved.file))


async def pin_catalog_source(registry: Registry, config: Config, model_id: str) -> None:
    """Before a download: a catalog model with a source and no pin yet, and no file, is
    resolved and pinned (and the pin kept). Nothing happens for any other model: one whose file
    is here needs no Hub (offline included)."""
    view = registry.view(model_id)
    spec = view.spec
    if spec.source is None or spec.url is not None or view.state is not State.ABSENT:
        return
    ref = parse_source(spec.source, f"the catalog's source of {model_id}")
    resolved = await resolve(ref, registry.hub.endpoint, registry.hub.token)

    def pin(current: ModelSpec) -> ModelSpec:
        return current if current.url is not None else pinned(current, resolved)

    view = await registry.call(model_id, lambda r: m.UpdateSpec(reply=r, change=pin))
    # Kept for the next start (whichever concurrent resolution pinned first is the one kept).
    await trio.to_thread.run_sync(write_pin, registry.store.root, view.spec)
