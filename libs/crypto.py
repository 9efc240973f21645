"""Envelope encryption for secrets the platform must read back (tenant passwords, app secrets).

Each value gets a fresh AES-256-GCM data key; the data key is wrapped with the key-encryption
key (KEK) from configuration. The stored blob names the KEK id, so KEKs can rotate: old blobs
keep decrypting with the old KEK as long as it is configured in the keyring, and `rewrap` moves a
blob to the primary KEK by re-wrapping only its data key (the data ciphertext is unchanged, so a
re-wrap never handles the plaintext).

Blob layout (then base64): b"cm1" | kek_id_len(1) | kek_id | wrap_nonce(12) | wrapped_dek(48)
| data_nonce(12) | ciphertext+tag.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_MAGIC = b"cm1"


def parse_previous(value: str) -> dict[str, bytes]:
    """`id:base64,id:base64` → {id: key}; the ids and keys of retired KEKs."""
    out: dict[str, bytes] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        kid, sep, key = part.partition(":")
        if not sep or not kid or not key:
            raise ValueError("CTRLMESH_KEK_PREVIOUS must be id:base64[,id:base64...]")
        out[kid.strip()] = base64.b64decode(key.strip())
    return out


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
    def from_b64(cls, kek_b64: str, kek_id: str, previous: str = "") -> Keyring:
        """The primary KEK plus the retired ones still needed to decrypt, `previous` being
        `id:base64[,id:base64...]` (CTRLMESH_KEK_PREVIOUS)."""
        keks = parse_previous(previous)
        keks[kek_id] = base64.b64decode(kek_b64)
        return cls(keks, kek_id)

    def encrypt(self, plaintext: bytes, aad: bytes = b"") -> str:
        kid = self._primary.encode()
        dek = AESGCM.generate_key(bit_length=256)
        wrap_nonce, data_nonce = os.urandom(12), os.urandom(12)
        wrapped = AESGCM(self._keks[self._primary]).encrypt(wrap_nonce, dek, kid)
        ct = AESGCM(dek).encrypt(data_nonce, plaintext, aad)
        blob = _MAGIC + bytes([len(kid)]) + kid + wrap_nonce + wrapped + data_nonce + ct
        return base64.b64encode(blob).decode()

    @property
    def primary(self) -> str:
        return self._primary

    @staticmethod
    def _split(token: str) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        blob = base64.b64decode(token)
        if not blob.startswith(_MAGIC) or len(blob) < 4:
            raise ValueError("not a ctrlmesh ciphertext")
        n = blob[3]
        kid = blob[4 : 4 + n]
        rest = blob[4 + n :]
        return kid, rest[:12], rest[12:60], rest[60:72], rest[72:]

    @classmethod
    def key_id(cls, token: str) -> str:
        """The id of the KEK a blob is wrapped with."""
        return cls._split(token)[0].decode()

    def _kek(self, kid: bytes) -> bytes:
        kek = self._keks.get(kid.decode())
        if kek is None:
            raise ValueError(f"unknown KEK id {kid.decode()!r}")
        return kek

    def decrypt(self, token: str, aad: bytes = b"") -> bytes:
        kid, wrap_nonce, wrapped, data_nonce, ct = self._split(token)
        dek = AESGCM(self._kek(kid)).decrypt(wrap_nonce, wrapped, kid)
        return AESGCM(dek).decrypt(data_nonce, ct, aad)

    def rewrap(self, token: str) -> str:
        """The blob with its data key wrapped by the primary KEK (unchanged if it already is)."""
        kid, wrap_nonce, wrapped, data_nonce, ct = self._split(token)
        new = self._primary.encode()
        if kid == new:
            return token
        dek = AESGCM(self._kek(kid)).decrypt(wrap_nonce, wrapped, kid)
        nonce = os.urandom(12)
        rewrapped = AESGCM(self._keks[self._primary]).encrypt(nonce, dek, new)
        blob = _MAGIC + bytes([len(new)]) + new + nonce + rewrapped + data_nonce + ct
        return base64.b64encode(blob).decode()

    def encrypt_str(self, plaintext: str, aad: str = "") -> str:
        return self.encrypt(plaintext.encode(), aad.encode())

    def decrypt_str(self, token: str, aad: str = "") -> str:
        return self.decrypt(token, aad.encode()).decode()
