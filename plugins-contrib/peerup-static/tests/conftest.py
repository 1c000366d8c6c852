"""The static plugin's tests use peerup's own fixtures (trio, a clean environment).

The in-process harness (real libp2p hosts, a real relay) ships with peerup as
``peerup.testing``, so these tests use exactly what peerup's own tests use.
"""

pytest_plugins = ["peerup.pytest_fixtures"]
