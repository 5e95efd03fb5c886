"""Encryption of personal identifiers (PAN, Aadhaar, passport numbers) at rest.

AES-256-GCM with a random 96-bit nonce per value. The key is derived with HKDF-SHA256
from settings.pii_key, or from settings.jwt_secret when pii_key is empty (dev/test
convenience; production should set FINTIDE_PII_KEY so rotating the JWT secret does not
make stored documents unreadable). The user id is bound as associated data, so a
ciphertext copied onto another user's row fails to decrypt.
Layout: version byte 0x01 | nonce (12 bytes) | ciphertext+tag.
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ops.settings import Settings

_VERSION = b"\x01"
_NONCE_BYTES = 12


@lru_cache(maxsize=4)
def _aead(secret: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"fintide-identity-pii",
               info=b"aes-256-gcm:v1").derive(secret.encode())
    return AESGCM(key)


def _cipher(settings: Settings) -> AESGCM:
    return _aead(settings.pii_key or settings.jwt_secret)


def encrypt(settings: Settings, plaintext: str, owner: uuid.UUID) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return _VERSION + nonce + _cipher(settings).encrypt(nonce, plaintext.encode(), owner.bytes)


def decrypt(settings: Settings, blob: bytes, owner: uuid.UUID) -> str:
    assert blob[:1] == _VERSION, "unknown PII ciphertext version"
    nonce, sealed = blob[1:1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES:]
    return _cipher(settings).decrypt(nonce, sealed, owner.bytes).decode()
