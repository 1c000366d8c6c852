"""peerup's shared fixtures live in :mod:`peerup.pytest_fixtures`, a pytest11 plugin.

Installing ``peerup[test]`` registers it (``[project.entry-points.pytest11]`` in
pyproject.toml), so these tests and any plugin author's tests get the same
fixtures: ``anyio_backend`` (trio), ``clean_peerup_env`` (autouse), ``home``,
``install_plugin``, ``quiet_attacker``, ``netlab`` and ``netlab_or_skip``.
"""
