"""The cluster protocol in-process: the key's replay window, receivers, answers bound to their
request, node ids bound to their keys, sealed tokens."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from modelpeer.daemon.errors import SignatureError
from modelpeer.daemon.lan.cluster import (
    ANY_RECEIVER,
    H_BODY,
    H_NODE,
    H_PUBLIC,
    H_SIG,
    H_TIME,
    ClusterKey,
    Credentials,
    NodeIdentity,
    body_digest,
)

KEY = bytes(range(32))


def node(tmp_path: Path, name: str, key: bytes = KEY) -> Credentials:
    return Credentials(ClusterKey(key), NodeIdentity.load_or_create(tmp_path / f"{name}.key"))


def test_a_request_is_valid_once_and_for_one_receiver(tmp_path: Path) -> None:
    a, b, c = node(tmp_path, "a"), node(tmp_path, "b"), node(tmp_path, "c")
    signed = a.sign_request("GET", "/x?y=1", b"", b.node_id)
    assert b.check_request("GET", "/x?y=1", signed.headers) == a.node_id
    with pytest.raises(SignatureError, match="replayed"):
        b.check_request("GET", "/x?y=1", signed.headers)
    with pytest.raises(SignatureError, match="another node"):
        c.check_request("GET", "/x?y=1", signed.headers)
    with pytest.raises(SignatureError, match="another node"):
        c.check_request("GET", "/x?y=1", signed.headers, any_receiver=True)


def test_any_receiver_is_only_for_routes_that_allow_it(tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    signed = a.sign_request("GET", "/status", b"", ANY_RECEIVER)
    with pytest.raises(SignatureError):
        b.check_request("GET", "/status", signed.headers)
    assert b.check_request("GET", "/status", signed.headers, any_receiver=True) == a.node_id


@pytest.mark.parametrize("change", ["method", "path", "body", "time", "sender", "key"])
def test_any_change_breaks_the_request(tmp_path: Path, change: str) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    signed = a.sign_request("POST", "/warm", b"{}", b.node_id)
    headers = dict(signed.headers)
    method, path = "POST", "/warm"
    if change == "method":
        method = "PUT"
    elif change == "path":
        path = "/warm?x"
    elif change == "body":
        headers[H_BODY] = body_digest(b"{ }")
    elif change == "time":
        headers[H_TIME] = f"{time.time() + 1:.3f}"
    elif change == "sender":  # another node's id with this node's key and signature
        headers[H_NODE] = node(tmp_path, "c").node_id
    elif change == "key":  # a keyless host's own signature under a real node's id
        other = node(tmp_path, "evil", key=b"\1" * 32)
        forged = other.sign_request("POST", "/warm", b"{}", b.node_id)
        headers = dict(forged.headers)
    with pytest.raises(SignatureError):
        b.check_request(method, path, headers)


def test_stale_and_unsigned_requests_are_refused(tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    signed = a.sign_request("GET", "/status", b"", b.node_id)
    with pytest.raises(SignatureError, match="unsigned"):
        b.check_request("GET", "/status", {})
    old = {**signed.headers, H_TIME: f"{time.time() - 120:.3f}"}
    with pytest.raises(SignatureError, match="off"):
        b.check_request("GET", "/status", old)


def test_an_answer_belongs_to_one_request_and_one_responder(tmp_path: Path) -> None:
    a, b, c = node(tmp_path, "a"), node(tmp_path, "b"), node(tmp_path, "c")
    first = a.sign_request("GET", "/status", b"", b.node_id)
    second = a.sign_request("GET", "/status", b"", b.node_id)
    answer = b.sign_answer(first.nonce, 200, body_digest(b"{}"))
    assert a.check_answer(first.nonce, 200, answer, b.node_id) == (b.node_id,
                                                                    body_digest(b"{}"))
    with pytest.raises(SignatureError):
        a.check_answer(second.nonce, 200, answer, b.node_id)  # replayed onto another request
    with pytest.raises(SignatureError):
        a.check_answer(first.nonce, 404, answer, b.node_id)  # another status
    with pytest.raises(SignatureError, match="not"):
        a.check_answer(first.nonce, 200, answer, c.node_id)  # not the node asked
    stolen = {**answer, H_NODE: c.node_id}
    with pytest.raises(SignatureError):
        a.check_answer(first.nonce, 200, stolen, ANY_RECEIVER)
    keyless = node(tmp_path, "evil", key=b"\2" * 32)
    with pytest.raises(SignatureError, match="MAC"):
        a.check_answer(first.nonce, 200, keyless.sign_answer(first.nonce, 200, "x"),
                       ANY_RECEIVER)


def test_a_node_id_is_bound_to_its_public_key(tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    signed = a.sign_request("GET", "/status", b"", b.node_id)
    swapped = {**signed.headers, H_PUBLIC: node(tmp_path, "c").identity.public_b64}
    with pytest.raises(SignatureError, match="public key"):
        b.check_request("GET", "/status", swapped)
    bad_sig = {**signed.headers, H_SIG: signed.headers[H_SIG][::-1]}
    with pytest.raises(SignatureError):
        b.check_request("GET", "/status", bad_sig)


def test_the_identity_survives_a_restart_and_is_private(tmp_path: Path) -> None:
    first = NodeIdentity.load_or_create(tmp_path / "node.key")
    again = NodeIdentity.load_or_create(tmp_path / "node.key")
    assert first.node_id == again.node_id and len(first.node_id) == 32
    assert (tmp_path / "node.key").stat().st_mode & 0o077 == 0


def test_sealed_tokens_open_only_with_the_key_and_the_same_context() -> None:
    key, other = ClusterKey(KEY), ClusterKey(b"\3" * 32)
    sealed = key.seal("Bearer hf_secret", "warm token abc")
    assert "hf_secret" not in sealed
    assert key.open(sealed, "warm token abc") == "Bearer hf_secret"
    for k, context in ((other, "warm token abc"), (key, "warm token xyz")):
        with pytest.raises(SignatureError):
            k.open(sealed, context)
    with pytest.raises(SignatureError):
        key.open("not base64!", "warm token abc")
    assert key.seal("t", "c") != key.seal("t", "c")  # a fresh nonce each time


def test_cluster_ids_differ_by_key_and_reveal_nothing() -> None:
    assert ClusterKey(KEY).cluster_id != ClusterKey(b"\4" * 32).cluster_id
    assert KEY.hex()[:16] not in ClusterKey(KEY).cluster_id
