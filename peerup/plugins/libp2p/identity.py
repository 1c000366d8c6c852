"""The node's Ed25519 identity: one key file in the peerup home.

The peer ID *is* the public key, so losing or leaking the file changes who the
node is. Hence: never overwrite an existing key, create it 0600 in a 0700 home,
and refuse to load a key that group or others can read (as ssh does).
The file holds the libp2p protobuf serialisation of the private key, the same
format go-libp2p and kubo use, so keys can move between implementations.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from peerup.core.errors import IdentityError

KEY_FILE = "identity.key"


def identity_path(home: Path) -> Path:
    """Where the key of the node whose home is ``home`` lives."""
    return Path(home) / KEY_FILE


def create_identity(home: Path) -> str:
    """Create a new Ed25519 key in ``home`` and return its peer ID.

    :raises IdentityError: a key already exists (it is never overwritten) or the
        home cannot be written.
    """
    path = identity_path(home)
    if path.exists():
        raise IdentityError(f"{path}: an identity already exists; remove it first to make a new one")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_pair = create_new_key_pair()
        data = key_pair.private_key.serialize()
        # O_EXCL: a concurrent `peerup init` cannot clobber the key we just checked for.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except FileExistsError as exc:
        raise IdentityError(f"{path}: an identity already exists; remove it first to make a new one") from exc
    except OSError as exc:
        raise IdentityError(f"{path}: cannot write the identity: {exc.strerror}") from exc
    return ID.from_pubkey(key_pair.public_key).to_base58()


def load_identity(home: Path) -> KeyPair:
    """Load the key pair from ``home``.

    :raises IdentityError: missing (run ``peerup init``), readable by group or
        others (``chmod 600``), unreadable or not a private key.
    """
    path = identity_path(home)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise IdentityError(f"{path}: no identity; run `peerup init` to create one") from exc
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the identity: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"{path}: readable by other users; run `chmod 600 {path}`")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read the identity: {exc.strerror}") from exc
    try:
        private_key = deserialize_private_key(data)
    except Exception as exc:  # protobuf and key errors have no common base
        raise IdentityError(f"{path}: not a peerup identity key ({exc.__class__.__name__})") from exc
    return KeyPair(private_key, private_key.get_public_key())


def peer_id_of(key_pair: KeyPair) -> str:
    """The base58 peer ID of ``key_pair``."""
    return ID.from_pubkey(key_pair.public_key).to_base58()
