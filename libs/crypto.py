"""Envelope encryption for secrets the platform must read back (tenant passwords, app secrets).

Each value gets a fresh AES-256-GCM data key; the data key is wrapped with the key-encryption
key (KEK) from configuration. The stored blob names the KEK id, so KEKs can rotate: old blobs
keep decrypting with the old KEK as long as it is configured in the keyring.

Blob layout (then base64): b"cm1" | kek_id_len(1) | kek_id | wrap_nonce(12) | wrapped_dek(48)
| data_nonce(12) | ciphertext+tag.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_MAGIC = b"cm1"


class Keyring:
    def __init__(self, keks: dict[str, bytes], primary: str):
        for kid, key in keks.items():
            if len(key) != 32:
                raise ValueError(f"KEK {kid!r} must be 32 bytes")
        if primary not in keks:
            raise ValueError(f"primary KEK {primary!r} is not in the keyring")
        self._keks = keks
        self._primary = primary

    @classmethod
    def from_b64(cls, kek_b64: str, kek_id: str) -> Keyring:
        return cls({kek_id: base64.b64decode(kek_b64)}, kek_id)

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> str:
        kid = self._primary.encode()
        dek = AESGCM.generate_key(bit_length=256)
        wrap_nonce, data_nonce = os.urandom(12), os.urandom(12)
        wrapped = AESGCM(self._keks[self._primary]).encrypt(wrap_nonce, dek, kid)
        ct = AESGCM(dek).encrypt(data_nonce, plaintext, aad)
        blob = _MAGIC + bytes([len(kid)]) + kid + wrap_nonce + wrapped + data_nonce + ct
        return base64.b64encode(blob).decode()

    def decrypt(self, token: str, aad: bytes = b"") -> bytes:
        blob = base64.b64decode(token)
        if not blob.startswith(_MAGIC):
            raise ValueError("not a ctrlmesh ciphertext")
        n = blob[3]
        kid = blob[4 : 4 + n]
        rest = blob[4 + n :]
        wrap_nonce, wrapped, data_nonce, ct = rest[:12], rest[12:60], rest[60:72], rest[72:]
        kek = self._keks.get(kid.decode())
        if kek is None:
            raise ValueError(f"unknown KEK id {kid.decode()!r}")
        dek = AESGCM(kek).decrypt(wrap_nonce, wrapped, kid)
        return AESGCM(dek).decrypt(data_nonce, ct, aad)

    def encrypt_str(self, plaintext: str, aad: str = "") -> str:
        return self.encrypt(plaintext.encode(), aad.encode())

    def decrypt_str(self, token: str, aad: str = "") -> str:
        return self.decrypt(token, aad.encode()).decode()
