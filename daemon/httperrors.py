"""How an error becomes an HTTP answer, in one place for every route of the local listener:
the Hub's error form (status, X-Error-Code, X-Error-Message, a JSON body), which
huggingface_hub shows to its user. Handlers raise; the middleware answers."""

from __future__ import annotations

import logging
import sqlite3

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import (
    BadRequest,
    HubError,
    InvalidName,
    ModelpeerError,
    NotCached,
    StoreFull,
    TransferFailed,
    is_disk_full,
)

log = logging.getLogger(__name__)

DISK_FULL = "the cache disk is full; free space, lower max_cache_size or unpin, then retry"


def hub_error_response(status: int, message: str, code: str = "",
                       headers: dict[str, str] | None = None) -> web.Response:
    h = dict(headers or {})
    if code:
        h["X-Error-Code"] = code
    h.setdefault("X-Error-Message", message.replace("\n", " ")[:500])
    return web.json_response({"error": message}, status=status, headers=h)


def answer_for(error: BaseException, what: str = "") -> web.Response | None:
    """The answer for an error a handler raised (None: not one of ours, let it propagate).
    `what` names the file or repo the request was about."""
    prefix = f"{what}: " if what else ""
    if isinstance(error, HubError):
        return hub_error_response(error.status, error.message, error.code, error.headers)
    if isinstance(error, (BadRequest, InvalidName)):
        return hub_error_response(400, f"{prefix}{error}")
    if isinstance(error, NotCached):
        return hub_error_response(404, f"{prefix}{error}")
    if isinstance(error, StoreFull) or is_disk_full(error) or (
            isinstance(error, TransferFailed) and is_disk_full(error.__cause__)):
        return hub_error_response(507, f"{prefix}{DISK_FULL}")
    if isinstance(error, TransferFailed):
        return hub_error_response(502, f"{prefix}could not fetch: {error}")
    return None


@web.middleware
async def errors_as_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (ModelpeerError, OSError, sqlite3.Error) as e:
        answer = answer_for(e)
        if answer is None:
            raise
        if answer.status == 507:
            log.error("cache disk full while answering %s %s: %s", request.method,
                      request.path, e)
        elif answer.status >= 500:
            log.error("%s %s answered %d: %s", request.method, request.path, answer.status, e)
        return answer
