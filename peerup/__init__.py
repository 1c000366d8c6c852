"""peerup: reach TCP services behind NAT, peer to peer, over libp2p."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("peerup")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
