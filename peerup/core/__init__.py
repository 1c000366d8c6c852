"""The framework: hook contract, plugin loading, settings and the data path.

Nothing in this package imports libp2p; the transport lives behind hooks so a
plugin can replace it (see docs/adr/0001-hook-contract.md).
"""
