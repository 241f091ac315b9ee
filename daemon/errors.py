"""Every error the daemon raises on purpose, under one base class. Where an error is also a
kind of a built-in one (a bad value, a failed read), it is that too, so `except ValueError`
and `except OSError` still catch it. The proxy and the control API turn them into HTTP
answers."""

from __future__ import annotations

import errno
import json
import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .upstream import Answer


class ModelpeerError(Exception):
    """Something modelpeer checked failed; the message says what, and what to do."""


class UpstreamError(ModelpeerError):
    """The upstream could not give an answer (unreachable, 5xx, broken transfer)."""


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamRefused(UpstreamError):
    """The upstream refused the request (401/403): no token, or one without access."""


class RangeIgnored(UpstreamError):
    """The origin answered a Range request with the whole body (or no Content-Range)."""


class HubError(ModelpeerError):
    """An answer in the Hub's error form: status, X-Error-Code, message."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    @classmethod
    def from_answer(cls, answer: Answer) -> HubError:
        message = answer.headers.get("X-Error-Message", "")
        if not message and answer.body:
            try:
                message = json.loads(answer.body).get("error", "")
            except (ValueError, AttributeError):
                message = answer.body[:200].decode(errors="replace")
        keep = {k: answer.headers[k] for k in ("X-Repo-Commit", "X-Error-Message")
                if k in answer.headers}
        return cls(answer.status, answer.headers.get("X-Error-Code", ""),
                   message or f"upstream answered HTTP {answer.status}", keep)

    @classmethod
    def unreachable(cls, what: str, reason: object) -> HubError:
        return cls(502, "", f"{what}: the upstream Hub is unreachable and nothing usable is "
                            f"cached ({reason}); retry when it is back")


class SignatureRefused(HubError):
    """403 with the reason: huggingface_hub shows it ("403 Forbidden: ...") and does not retry."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(403, "SignatureVerificationFailed",
                         f"signature verification failed: {what}: {reason}")
        self.reason = reason


class DigestMismatch(ModelpeerError):
    """The bytes of a blob do not hash to its name; they were discarded."""


class ChunkDamaged(ModelpeerError, OSError):
    """A complete chunk's file no longer matches its xxh3 (damaged on disk): never served."""


class TransferFailed(ModelpeerError):
    pass


class PeerError(ModelpeerError):
    """A peer did not answer, answered something unauthentic, or something malformed."""


class BadMessage(ModelpeerError, ValueError):
    """A peer message that does not have the expected shape."""


class SignatureError(ModelpeerError):
    """A peer message is not authentic, not fresh, not for this node, or replayed."""


class ClusterKeyError(ModelpeerError, ValueError):
    """The key file is missing, unreadable, malformed or readable by others."""


class ConfigError(ModelpeerError, ValueError):
    """A setting is unknown or has a bad value; the message names where it came from."""


class InvalidName(ModelpeerError, ValueError):
    """A repo id, revision, path or digest that the Hub would never use."""


class BundleError(ModelpeerError, ValueError):
    """The archive is not a whole, intact bundle; `offset` is where that was found."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte {offset} of the archive)")
        self.offset = offset


class NotCached(ModelpeerError, LookupError):
    """The revision to pin has no file entry in the catalog."""


class BadRequest(ModelpeerError, ValueError):
    pass


class StoreFull(ModelpeerError, OSError):
    """The cache's disk (or the index on it) is full."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.ENOSPC, f"{what}: the cache disk is full; free space, lower "
                                       "max_cache_size or unpin, then retry")


class NoReflink(ModelpeerError, OSError):
    """These files cannot share extents (filesystem, mount, or permission); say why."""


class ContentDiffers(ModelpeerError):
    """FIDEDUPERANGE found the two ranges different: nothing was shared."""


class SwarmError(ModelpeerError):
    pass


class SwarmStalled(SwarmError):
    pass


def is_disk_full(error: BaseException | None) -> bool:
    """Whether the error (a write, an index update) failed for want of disk space."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    return isinstance(error, sqlite3.Error) and "full" in str(error)
