"""The command line: click declarations and printing only (pool.py: the group and the pool's
commands; clients.py: batch, webui; access.py: keys, usage, metrics; site.py: init, check,
render; context.py: what they share)."""

from .pool import main

__all__ = ["main"]
