"""How errors become HTTP answers (httperrors.py), table by table."""

from __future__ import annotations

import errno
import json
import sqlite3

import pytest

from modelpeer.daemon.errors import (
    BadRequest,
    HubError,
    InvalidName,
    NotCached,
    PeerError,
    StoreFull,
    TransferFailed,
)
from modelpeer.daemon.httperrors import answer_for


def _full() -> TransferFailed:
    try:
        raise TransferFailed("writing") from OSError(errno.ENOSPC, "No space left on device")
    except TransferFailed as e:
        return e


@pytest.mark.parametrize(("error", "status", "says"), [
    (HubError(404, "EntryNotFound", "no such file"), 404, "no such file"),
    (BadRequest("malformed Range"), 400, "malformed Range"),
    (InvalidName("a/../b is not a repo id"), 400, "not a repo id"),
    (NotCached("org/m@main is not cached"), 404, "not cached"),
    (StoreFull("writing blob ab12"), 507, "disk is full"),
    (OSError(errno.ENOSPC, "No space left on device"), 507, "disk is full"),
    (sqlite3.OperationalError("database or disk is full"), 507, "disk is full"),
    (_full(), 507, "disk is full"),
    (TransferFailed("the upstream answered 500"), 502, "could not fetch"),
])
def test_our_errors_become_hub_answers(error: BaseException, status: int, says: str) -> None:
    answer = answer_for(error, "org/m/f.bin")
    assert answer is not None and answer.status == status
    assert answer.text is not None and says in json.loads(answer.text)["error"]
    assert says in answer.headers["X-Error-Message"]


@pytest.mark.parametrize("error", [
    ConnectionResetError("the reader left"), OSError(errno.EIO, "I/O error"),
    PeerError("peer x sent garbage"), ValueError("a bug"),
])
def test_other_errors_are_not_answered(error: BaseException) -> None:
    assert answer_for(error) is None
