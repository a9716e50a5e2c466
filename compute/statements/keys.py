"""The statement signing key: where it lives, its passphrase, creation and rotation.

The private key is an Ed25519 PKCS#8 PEM at the setting ``statements.signing_key``
(``/etc/scopemeter/statement-signing.key`` by default: outside the install directory), mode 0600,
encrypted with cryptography's ``BestAvailableEncryption`` when a passphrase is configured
(``statements.signing_key_passphrase`` from the environment, or ``signing_key_passphrase_file``).
Its public key is beside it (``<key>.pub``): customers verify statements with it.

Rotation (``statements keygen --force``): the current public key is kept as
``<key>.<key id>.pub`` before the new pair replaces it, so every statement the old key signed still
verifies with that file; the old private key is gone (a rotation after a leak must not keep it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ops.errors import UserError
from ops.settings import Settings, StatementsSettings

log = logging.getLogger("scopemeter.statements")

ENV_PASSPHRASE = "SCOPEMETER_STATEMENTS__SIGNING_KEY_PASSPHRASE"


def passphrase(settings: StatementsSettings | None = None) -> bytes | None:
    """The configured passphrase (environment or file), or None for an unencrypted key."""
    s = settings if settings is not None else Settings().statements
    if s.signing_key_passphrase is not None:
        secret = s.signing_key_passphrase.get_secret_value()
        where = ENV_PASSPHRASE
    elif s.signing_key_passphrase_file is not None:
        try:
            secret = s.signing_key_passphrase_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"statements.signing_key_passphrase_file: {exc}") from None
        where = str(s.signing_key_passphrase_file)
    else:
        return None
    if not secret:
        raise UserError(f"the signing key passphrase from {where} is empty")
    return secret.encode()


def public_key_path(private: Path) -> Path:
    return private.with_name(private.name + ".pub")


def retired_public_key_path(private: Path, key_id: str) -> Path:
    return private.with_name(f"{private.name}.{key_id}.pub")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically with ``mode`` from the start (never readable by others meanwhile)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def keygen(path: Path, *, overwrite: bool = False, secret: bytes | None = None) -> Path:
    """Create a new key pair at ``path`` (+ ``.pub``); returns the public key's path. With
    ``overwrite`` the current key is retired first (its public key kept, see the module doc)."""
    from compute.statements.document import key_id, load_public_key

    pub = public_key_path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; refusing to replace a signing key (--force rotates it)")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and pub.exists():
            old = pub.read_bytes()
            retired = retired_public_key_path(path, key_id(load_public_key(pub)))
            _write(retired, old, 0o644)
            log.warning("retired signing key: public key kept at %s (verifies older statements)", retired)
        _write(path, pem, 0o600)
        _write(pub, public, 0o644)
    except OSError as exc:
        raise UserError(
            f"cannot write the signing key at {path}: {exc.strerror}; run keygen as the user that may write"
            " there, or set statements.signing_key (SCOPEMETER_STATEMENTS__SIGNING_KEY)"
        ) from None
    return pub


def load_private_key(path: Path, secret: bytes | None = None) -> Ed25519PrivateKey:
    """The signing key at ``path``, decrypted with ``secret`` when it is encrypted."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"no signing key at {path}; create one with `scopemeter statements keygen`"
            " (path: setting statements.signing_key)"
        ) from None
    except PermissionError:
        raise UserError(f"cannot read the signing key at {path}: permission denied") from None
    try:
        key = serialization.load_pem_private_key(data, password=secret)
    except TypeError:  # encrypted without a passphrase, or a passphrase for an unencrypted key
        if secret is None:
            raise UserError(
                f"{path} is protected by a passphrase: set {ENV_PASSPHRASE}"
                " or statements.signing_key_passphrase_file"
            ) from None
        log.warning("%s is not encrypted although a passphrase is configured", path)
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise UserError(f"{path}: wrong passphrase, or not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path}: not an Ed25519 key")
    return key
