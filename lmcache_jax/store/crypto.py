"""Encryption at rest: AES-256-GCM with a key from a file or an environment variable.

GCM authenticates as well as encrypts, so tampering with a stored chunk is
detected on read. The chunk's key is bound as associated data, so a valid
ciphertext moved under another name is rejected too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_FORMS = "32 raw bytes, 64 hex digits, or base64 of 32 bytes"


class Cipher:
  """Seals and opens byte strings; each seal draws a fresh random nonce."""

  def __init__(self, key: bytes):
    if len(key) != 32:
      raise ValueError(f"an AES-256 key has 32 bytes, got {len(key)}")
    self._aead = AESGCM(key)
    self.key_check = hmac.new(key, b"lmcache_jax key check",
                              hashlib.sha256).hexdigest()

  def seal(self, data: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + self._aead.encrypt(nonce, data, associated)

  def open(self, sealed: bytes, associated: bytes) -> bytes | None:
    """The plaintext, or None if the data or its association was altered."""
    if len(sealed) < NONCE_BYTES + 16:
      return None
    try:
      return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                associated)
    except InvalidTag:
      return None


def _parse_key(text: bytes, source: str) -> bytes:
  if len(text) == 32:
    return text
  stripped = text.strip()
  if len(stripped) == 64:
    try:
      return binascii.unhexlify(stripped)
    except binascii.Error:
      pass
  try:
    key = base64.b64decode(stripped, validate=True)
  except binascii.Error:
    key = b""
  if len(key) == 32:
    return key
  raise ValueError(f"the encryption key in {source} is not valid: it holds "
                   f"{len(text)} bytes; valid: {KEY_FORMS}")


def load_cipher(key_file: str = "", key_env: str = "") -> Cipher | None:
  """A cipher from ``key_file`` or the variable ``key_env``; None if neither is set."""
  if key_file and key_env:
    raise ValueError(f"give the encryption key by file ({key_file!r}) or by "
                     f"environment variable ({key_env!r}), not both")
  if key_file:
    path = os.path.expanduser(key_file)
    try:
      with open(path, "rb") as f:
        return Cipher(_parse_key(f.read(), f"key file {path!r}"))
    except OSError as e:
      raise ValueError(f"cannot read the encryption key file {path!r}: "
                       f"{e.strerror}") from None
  if key_env:
    value = os.environ.get(key_env)
    if not value:
      raise ValueError(f"the environment variable {key_env!r} named for the "
                       f"encryption key is not set")
    return Cipher(_parse_key(value.encode(), f"${key_env}"))
  return None
