"""Built-in plugins, each registered through the ``peerup.plugins`` entry points."""
