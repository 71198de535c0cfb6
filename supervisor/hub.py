"""Resolving a Hub reference to one pinned file: its commit, size and LFS sha256.

Only metadata comes through huggingface_hub's `HfApi` (one `model_info` request, in a worker
thread); the file's bytes go through modeld's own verified download, from
`{endpoint}/{repo}/resolve/{commit}/{file}`. No token is sent (`token=False`): a token stored
for the Hub by other tools is never picked up.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from typing import Any

import attrs
import structlog
import trio

from actors.errors import InvalidInput, Unavailable
from actors.spec import SHA256_PATTERN, SplitPart
from supervisor.hub_refs import ChoiceError, HubRef, choose_file, split_parts

log = structlog.get_logger("modeld.hub")

DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT = re.compile(r"[0-9a-f]{40}")
REQUEST_TIMEOUT = 20.0  # seconds for the metadata request (the caller bounds the whole wait)


@attrs.frozen
class Resolved:
    """One file of one commit, and where its bytes are."""

    source: str  # the reference, canonical (hf.co/...)
    repo: str
    commit: str
    file: str
    size: int
    sha256: str
    url: str
    # A split set (`file` is its first part): every part, in order; `size` is then the set's.
    parts: tuple[SplitPart, ...] = ()


def resolve_url(endpoint: str, repo: str, commit: str, file: str) -> str:
    path = urllib.parse.quote(file, safe="/")
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{commit}/{path}"


async def resolve(ref: HubRef, endpoint: str) -> Resolved:
    """Ask the Hub at `endpoint` which commit and file `ref` names now.

    Raises InvalidInput (400: unknown repository or revision, no such file or quantization,
    several candidates, a file without an LFS sha256) or Unavailable (503: the Hub cannot be
    reached or fails), each naming the reference.
    """
    resolved = await trio.to_thread.run_sync(
        functools.partial(_resolve_blocking, ref, endpoint), abandon_on_cancel=True)
    log.info("hub_resolved", source=resolved.source, revision=resolved.commit,
             file=resolved.file, bytes=resolved.size, parts=len(resolved.parts) or 1)
    return resolved


def _resolve_blocking(ref: HubRef, endpoint: str) -> Resolved:
    info = _model_info(ref, endpoint)
    where = ref.canonical()
    commit = getattr(info, "sha", None)
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        raise Unavailable(f"{endpoint} answered for {where} without a commit id",
                          code="hub_bad_answer")
    siblings = {s.rfilename: s for s in getattr(info, "siblings", None) or []}
    try:
        file = choose_file(ref, list(siblings))
    except ChoiceError as exc:
        raise InvalidInput(str(exc), code=exc.code) from None
    parts = tuple(_part(ref, endpoint, commit, siblings, name)
                  for name in split_parts(file) or [file])
    first = parts[0]
    return Resolved(source=where, repo=ref.repo, commit=commit, file=file,
                    size=sum(p.size for p in parts), sha256=first.sha256, url=first.url,
                    parts=parts if len(parts) > 1 else ())


def _part(ref: HubRef, endpoint: str, commit: str, siblings: dict[str, Any],
          file: str) -> SplitPart:
    """One file of the commit with its LFS sha256 and size (InvalidInput without them)."""
    lfs = siblings[file].lfs
    sha256 = str(lfs["sha256"]).lower() if lfs else ""
    size = lfs["size"] if lfs else None
    if not SHA256_PATTERN.fullmatch(sha256) or not isinstance(size, int) or size <= 0:
        raise InvalidInput(f"{file} of {ref.repo} is not stored with an LFS sha256 and size, so "
                           f"modeld cannot verify it ({ref.canonical()})",
                           code="hub_file_unverifiable")
    return SplitPart(file=file, url=resolve_url(endpoint, ref.repo, commit, file),
                     sha256=sha256, size=size)


def _model_info(ref: HubRef, endpoint: str) -> Any:
    """HfApi.model_info with file metadata, its errors told as modeld's."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = ref.canonical()
    api = HfApi(endpoint=endpoint.rstrip("/"), token=False, library_name="modeld")
    try:
        return api.model_info(ref.repo, revision=ref.revision, files_metadata=True,
                              timeout=REQUEST_TIMEOUT, token=False)
    except GatedRepoError:
        raise InvalidInput(f"{ref.repo} is gated on {endpoint}: accept its licence on its page; "
                           f"modeld does not send Hub tokens yet ({where})",
                           code="hub_repo_gated") from None
    except RepositoryNotFoundError:
        raise InvalidInput(f"no repository {ref.repo} on {endpoint} (or it is private) "
                           f"({where})", code="hub_repo_not_found") from None
    except RevisionNotFoundError:
        raise InvalidInput(f"{ref.repo} has no revision {ref.revision!r} on {endpoint} "
                           f"({where})", code="hub_revision_not_found") from None
    except HFValidationError as exc:
        raise InvalidInput(f"{where}: {exc}", code="invalid_reference") from None
    except OfflineModeIsEnabled:
        raise Unavailable(f"cannot resolve {where}: HF_HUB_OFFLINE is set",
                          code="hub_offline") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status == 404:
            raise InvalidInput(f"{endpoint} has no {where} (HTTP 404)",
                               code="hub_not_found") from None
        if 400 <= status < 500 and status != 429:
            raise InvalidInput(f"{endpoint} refused {where} (HTTP {status})",
                               code="hub_refused") from None
        raise Unavailable(f"{endpoint} answered HTTP {status} for {where}; try again later",
                          code="hub_error") from None
    except (httpx2.HTTPError, OSError, ValueError) as exc:
        raise Unavailable(f"cannot reach the Hub at {endpoint} to resolve {where}: "
                          f"{type(exc).__name__}", code="hub_unreachable") from None
