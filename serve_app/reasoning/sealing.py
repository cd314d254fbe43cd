"""Sealed reasoning: K2.5's thinking handed to a client that keeps no state, to come back.

Agents that do not keep the model's reasoning readable (Claude Code with
`display: "omitted"`) still send back the opaque `signature` of each thinking block. It
holds the reasoning sealed with a server key (AES-256-GCM, authenticated; the time it was
sealed inside), so the next turn's prompt gets K2.5's own reasoning back. A signature
that does not open (tampered, another server's, too old) is dropped, never shown.

Keys: `KIMI_SERVE_REASONING_KEYS` (comma-separated, base64 of 32 bytes; the first seals,
all open, so a rotated-out key still reads what it sealed), or else one key kept in the
state dir (`reasoning.key`, created once, shared by every ingress replica).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEYS_ENV = "KIMI_SERVE_REASONING_KEYS"
AAD = b"kimi-reasoning-v1"
VERSION = 1
HEADER = struct.Struct(">B4s12s")  # version, key id, nonce


@dataclass
class Opened:
    """How one request's earlier reasoning came back: seals opened or dropped (altered,
    foreign, too old), turns filled from the server's memory (chat completions)."""

    sealed: int = 0
    dropped: int = 0
    remembered: int = 0


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


class Sealer:
    def __init__(self, keys: list[bytes], max_age_s: float = 30 * 86400) -> None:
        if not keys or any(len(k) != 32 for k in keys):
            raise ValueError("reasoning keys must be 32 bytes each, at least one")
        self.keys = {key_id(k): AESGCM(k) for k in keys}
        self.current = key_id(keys[0])
        self.max_age_s = max_age_s
        self.opened = Opened()

    def counting(self) -> Sealer:
        """This sealer for one request, counting what its seals give back (`opened`)."""
        twin = copy.copy(self)
        twin.opened = Opened()
        return twin

    def seal(self, text: str, now: float | None = None) -> str:
        nonce = os.urandom(12)
        sealed_at = struct.pack(">d", time.time() if now is None else now)
        body = self.keys[self.current].encrypt(nonce, sealed_at + text.encode(), AAD)
        raw = HEADER.pack(VERSION, self.current, nonce) + body
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def open(self, token: str, now: float | None = None) -> str | None:
        """The reasoning sealed in `token`, or None if it is not ours, altered or too old."""
        text = self._open(token, now)
        if text is None:
            self.opened.dropped += 1
        else:
            self.opened.sealed += 1
        return text

    def _open(self, token: str, now: float | None) -> str | None:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            version, kid, nonce = HEADER.unpack_from(raw)
            aead = self.keys.get(kid)
            if version != VERSION or aead is None:
                return None
            plain = aead.decrypt(nonce, raw[HEADER.size :], AAD)
            (sealed_at,) = struct.unpack_from(">d", plain)
            text = plain[8:].decode()
        except (binascii.Error, ValueError, struct.error, InvalidTag, UnicodeDecodeError):
            return None
        age = (time.time() if now is None else now) - sealed_at
        return text if 0 <= age <= self.max_age_s else None


def deployment_sealer(state_dir: Path) -> Sealer:
    configured = os.environ.get(KEYS_ENV, "").strip()
    if configured:
        return Sealer([base64.b64decode(k) for k in configured.split(",") if k.strip()])
    return Sealer([state_key(state_dir / "reasoning.key")])


def state_key(path: Path) -> bytes:
    """The deployment's key in its state dir: made by whichever replica comes first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another replica may be writing it this moment
            key = path.read_bytes()
            if len(key) == 32:
                return key
            time.sleep(0.02)
        raise ValueError(f"{path} does not hold a 32-byte key") from None
    key = os.urandom(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key
