"""The node key: created once, private, and refused when unsafe or missing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from peerup.core.errors import IdentityError
from peerup.plugins.libp2p.identity import create_identity, identity_path, load_identity, peer_id_of


def test_create_then_load_gives_the_same_peer_id(tmp_path: Path) -> None:
    home = tmp_path / "home"
    peer_id = create_identity(home)
    assert peer_id.startswith("12D3KooW")
    assert stat.S_IMODE(identity_path(home).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert peer_id_of(load_identity(home)) == peer_id


def test_existing_identity_is_never_overwritten(tmp_path: Path) -> None:
    create_identity(tmp_path)
    before = identity_path(tmp_path).read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        create_identity(tmp_path)
    assert identity_path(tmp_path).read_bytes() == before


def test_missing_identity_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="run `peerup init`"):
        load_identity(tmp_path)


def test_identity_readable_by_others_is_refused(tmp_path: Path) -> None:
    create_identity(tmp_path)
    path = identity_path(tmp_path)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match=f"chmod 600 {path}"):
        load_identity(tmp_path)


def test_garbage_key_file_is_refused(tmp_path: Path) -> None:
    path = identity_path(tmp_path)
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not a peerup identity key"):
        load_identity(tmp_path)
