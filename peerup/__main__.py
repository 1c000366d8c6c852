from peerup.cli import entry

entry()
