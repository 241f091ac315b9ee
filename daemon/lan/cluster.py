"""The cluster: who belongs, who is who, and how they prove it.

Belonging is holding the cluster key. Identity is a node's own Ed25519 key: its node id is the
hash of the public key, so no node can speak as another. Every peer API request carries a MAC
(with a key derived from the cluster key) and the sender's signature over the method, path, body
digest, time, a fresh nonce, the sender and the receiver: it is valid once, for one receiver.
Every answer carries the same pair over the request's nonce, the status, the responder and the
body digest: it belongs to one request, and proves the responder holds the key too.

Tokens cross the LAN sealed with an AEAD cipher whose key is derived from the cluster key. The
cluster id announced on mDNS is derived from the key as well and reveals nothing of it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import SignatureError
from ..keyfile import cluster_id_of

REPLAY_WINDOW = 30.0
MAX_REMEMBERED_NONCES = 200_000
ANY_RECEIVER = "*"  # a first contact with a static peer, whose id is not known yet
UNHASHED_BODY = "-"  # a streamed answer: its bytes are checked against the blob digest instead
EMPTY_BODY = hashlib.sha256(b"").hexdigest()

H_NODE = "X-Modelpeer-Node"
H_TO = "X-Modelpeer-To"
H_TIME = "X-Modelpeer-Time"
H_NONCE = "X-Modelpeer-Nonce"
H_BODY = "X-Modelpeer-Body"
H_PUBLIC = "X-Modelpeer-Public-Key"
H_MAC = "X-Modelpeer-Mac"
H_SIG = "X-Modelpeer-Signature"


def _derive(key: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"modelpeer {purpose} v1".encode()).derive(key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise SignatureError("malformed base64") from e


class ClusterKey:
    """What the shared secret is used for: the cluster id, MACs, sealed tokens."""

    def __init__(self, key: bytes) -> None:
        self.cluster_id = cluster_id_of(key)
        self._mac_key = _derive(key, "message mac")
        self._aead = ChaCha20Poly1305(_derive(key, "token seal"))

    def mac(self, message: bytes) -> str:
        return hmac.new(self._mac_key, message, hashlib.sha256).hexdigest()

    def mac_ok(self, message: bytes, mac: str) -> bool:
        return hmac.compare_digest(mac.encode(), self.mac(message).encode())

    def seal(self, secret: str, context: str) -> str:
        """`secret` encrypted for the cluster, bound to `context` (e.g. a job id)."""
        nonce = os.urandom(12)
        return _b64(nonce + self._aead.encrypt(nonce, secret.encode(), context.encode()))

    def open(self, sealed: str, context: str) -> str:
        raw = _unb64(sealed)
        try:
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except (InvalidTag, ValueError, UnicodeDecodeError) as e:
            raise SignatureError(f"a sealed value for {context!r} does not open with this "
                                 "cluster key") from e


def node_id_of(public_key: bytes) -> str:
    return hashlib.sha256(b"modelpeer node\0" + public_key).hexdigest()[:32]


class NodeIdentity:
    """This node's Ed25519 key, kept beside its cache, readable by its owner only."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)
        self.public_b64 = _b64(self.public)
        self.node_id = node_id_of(self.public)

    @classmethod
    def load_or_create(cls, path: Path) -> NodeIdentity:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        if len(raw) == 32:
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        private = Ed25519PrivateKey.generate()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private.private_bytes(serialization.Encoding.Raw,
                                          serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption()))
        tmp.replace(path)
        return cls(private)

    def sign(self, message: bytes) -> str:
        return _b64(self._private.sign(message))


def _verify_node(node_id: str, public_b64: str, message: bytes, signature: str) -> None:
    public = _unb64(public_b64)
    if len(public) != 32 or node_id_of(public) != node_id:
        raise SignatureError(f"the public key is not node {node_id[:16]}'s")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(_unb64(signature), message)
    except (InvalidSignature, ValueError) as e:
        raise SignatureError(f"bad node signature from {node_id[:16]}") from e


@dataclasses.dataclass(frozen=True)
class SignedRequest:
    headers: dict[str, str]
    nonce: str


def body_digest(body: bytes | bytearray) -> str:
    return hashlib.sha256(body).hexdigest()


class Credentials:
    """Signs this node's peer messages and checks the other nodes'."""

    def __init__(self, key: ClusterKey, identity: NodeIdentity) -> None:
        self.key = key
        self.identity = identity
        self.node_id = identity.node_id
        self._nonces: dict[str, float] = {}  # nonces seen -> when they may be forgotten

    # --- requests -----------------------------------------------------------------------
    @staticmethod
    def _request_message(method: str, path_qs: str, digest: str, ts: str, nonce: str,
                         sender: str, receiver: str) -> bytes:
        return "\n".join(["modelpeer request v1", method.upper(), path_qs, digest, ts, nonce,
                          sender, receiver]).encode()

    def sign_request(self, method: str, path_qs: str, body: bytes,
                     receiver: str) -> SignedRequest:
        ts, nonce, digest = f"{time.time():.3f}", secrets.token_hex(16), body_digest(body)
        message = self._request_message(method, path_qs, digest, ts, nonce, self.node_id,
                                        receiver)
        return SignedRequest({H_NODE: self.node_id, H_TO: receiver, H_TIME: ts,
                              H_NONCE: nonce, H_BODY: digest, H_PUBLIC: self.identity.public_b64,
                              H_MAC: self.key.mac(message),
                              H_SIG: self.identity.sign(message)}, nonce)

    def check_request(self, method: str, path_qs: str, headers: Mapping[str, str], *,
                      any_receiver: bool = False) -> str:
        """The sender's node id if the request's headers are authentic, fresh, for this node
        and not seen before; raises SignatureError otherwise. The body is checked separately
        against the signed digest (`H_BODY`), so nothing is read before this passes."""
        fields = [headers.get(h, "") for h in (H_NODE, H_TO, H_TIME, H_NONCE, H_BODY,
                                               H_PUBLIC, H_MAC, H_SIG)]
        sender, receiver, ts, nonce, digest, public, mac, sig = fields
        if not all(fields):
            raise SignatureError("unsigned request")
        if receiver != self.node_id and not (any_receiver and receiver == ANY_RECEIVER):
            raise SignatureError("the request is meant for another node")
        _check_fresh(ts)
        message = self._request_message(method, path_qs, digest, ts, nonce, sender, receiver)
        if not self.key.mac_ok(message, mac):
            raise SignatureError("bad MAC (another cluster key?)")
        _verify_node(sender, public, message, sig)
        self._remember_nonce(nonce)
        return sender

    def _remember_nonce(self, nonce: str) -> None:
        now = time.monotonic()
        if nonce in self._nonces:
            raise SignatureError("replayed request")
        if len(self._nonces) >= MAX_REMEMBERED_NONCES:
            self._nonces = {n: t for n, t in self._nonces.items() if t > now}
            if len(self._nonces) >= MAX_REMEMBERED_NONCES:
                raise SignatureError("too many requests in the replay window; try again")
        self._nonces[nonce] = now + 2 * REPLAY_WINDOW

    # --- answers ------------------------------------------------------------------------
    @staticmethod
    def _answer_message(nonce: str, status: int, responder: str, digest: str) -> bytes:
        return "\n".join(["modelpeer answer v1", nonce, str(status), responder,
                          digest]).encode()

    def sign_answer(self, nonce: str, status: int, digest: str) -> dict[str, str]:
        message = self._answer_message(nonce, status, self.node_id, digest)
        return {H_NODE: self.node_id, H_BODY: digest, H_PUBLIC: self.identity.public_b64,
                H_MAC: self.key.mac(message), H_SIG: self.identity.sign(message)}

    def check_answer(self, nonce: str, status: int, headers: Mapping[str, str],
                     expected: str) -> tuple[str, str]:
        """(responder node id, signed body digest) of an authentic answer to the request
        with `nonce` from `expected` (or from anyone, for ANY_RECEIVER)."""
        fields = [headers.get(h, "") for h in (H_NODE, H_BODY, H_PUBLIC, H_MAC, H_SIG)]
        responder, digest, public, mac, sig = fields
        if not all(fields):
            raise SignatureError(f"unsigned answer (HTTP {status})")
        if expected not in (ANY_RECEIVER, responder):
            raise SignatureError(f"answered by node {responder[:16]}, not {expected[:16]}")
        message = self._answer_message(nonce, status, responder, digest)
        if not self.key.mac_ok(message, mac):
            raise SignatureError("bad MAC on the answer (another cluster key?)")
        _verify_node(responder, public, message, sig)
        return responder, digest


def _check_fresh(ts: str) -> None:
    try:
        age = abs(time.time() - float(ts))
    except ValueError as e:
        raise SignatureError("bad time stamp") from e
    if not age <= REPLAY_WINDOW:
        raise SignatureError(f"time stamp {age:.0f}s off (clocks out of sync?)")
