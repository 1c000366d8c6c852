"""The built-in libp2p transport plugin (hooks in :mod:`.plugin`, quirks in :mod:`.workarounds`)."""
