"""``peerup daemon``: the long-running node, its control API, metrics and systemd integration."""
