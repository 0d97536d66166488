"""``python -m dfatorch``: the command line."""

from .cli import run

run()
