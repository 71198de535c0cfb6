"""What can go wrong with a download: the errors callers see (`DownloadError` and its kinds, each
with a machine-readable `code`), the two that stay inside an attempt (`ContentChanged`,
`Transient`), and transport and disk errors put in plain words."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import ClassVar

from actors.partial import partial_path


class DownloadError(Exception):
    """A download failed for good. `code` is machine-readable; the message says what to do."""

    code: ClassVar[str] = "download_error"


class OriginError(DownloadError):
    """The origin answered, but not with the file (4xx, or 5xx after the retries)."""

    code = "origin_error"


class OriginUnreachable(DownloadError):
    """No usable connection to the origin (refused, reset, stalled) after the retries."""

    code = "origin_unreachable"


class ChecksumMismatch(DownloadError):
    code = "checksum_mismatch"


class SizeMismatch(DownloadError):
    code = "size_mismatch"


class DiskFull(DownloadError):
    code = "disk_full"


class DiskError(DownloadError):
    code = "disk_error"


class UrlRefused(DownloadError):
    """The URL (or a redirect target) is not one modeld will fetch."""

    code = "url_refused"


class TooSlow(DownloadError):
    """The origin sent less than [download] min_rate over a whole window (a drip that the stall
    timeout alone would wait on forever)."""

    code = "origin_too_slow"


class TooManyRedirects(DownloadError):
    code = "too_many_redirects"


class FileInvalid(DownloadError):
    """The origin's bytes are not a model file modeld can run (`DownloadRequest.magic` and
    `verify` decide); the partial is deleted, since more of the same bytes cannot mend it."""

    code = "model_file_invalid"


class ContentChanged(Exception):
    """The origin's answer does not fit the partial: start over. The message says why."""


class Transient(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, reason: str, *, retry_after: float | None = None, status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


def disk_error(exc: OSError, dest: Path) -> DownloadError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # Whether a partial is kept is known only when the attempt has ended: the model says.
        return DiskFull(f"no space left for {dest.name} in {dest.parent}; free some space and "
                        "download again")
    return DiskError(f"cannot write {partial_path(dest)}: {exc.strerror or exc}")


# What transport errors say, as a person would: (pattern in the error's text, plain words).
_PLAIN_REASONS = (
    (re.compile(r"Name or service not known|nodename nor servname|No address associated|"
                r"Temporary failure in name resolution|Errno -[235]\b", re.I), "name not resolved"),
    (re.compile(r"Connection refused|All connection attempts failed", re.I),
     "connection refused"),
    (re.compile(r"Connection reset", re.I), "connection reset"),
    (re.compile(r"Network is unreachable", re.I), "network unreachable"),
    (re.compile(r"No route to host", re.I), "no route to host"),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED", re.I), "its TLS certificate does not verify"),
)


def describe(exc: BaseException, fallback: str) -> str:
    """A transport error in plain words ("name not resolved", "connection refused"); httpx's
    often has an empty message and keeps the reason (e.g. a certificate that does not verify)
    in its cause."""
    reason, seen = "", exc
    for _ in range(8):  # the first non-empty message down the chain of causes
        reason = str(seen)
        following = seen.__cause__ or seen.__context__
        if reason or following is None:
            break
        seen = following
    return plain(" | ".join(_messages(exc))) or re.sub(
        r"^\[Errno -?\d+\]\s*", "", reason) or fallback


def _messages(exc: BaseException, depth: int = 0) -> list[str]:
    """Every message down an error's causes and exception groups (trio's "all attempts to
    connect ... failed" keeps the refusals in a group)."""
    if depth > 8:
        return []
    found = [str(exc)]
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found += _messages(inner, depth + 1)
    following = exc.__cause__ or exc.__context__
    if following is not None:
        found += _messages(following, depth + 1)
    return found


def plain(text: str) -> str | None:
    """The plain words for a transport error's text, when a pattern knows them."""
    for pattern, words in _PLAIN_REASONS:
        if pattern.search(text):
            return words
    return None
