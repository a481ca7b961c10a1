"""`python -m hpcserve` is the hpcserve command."""

from .cli import main

main()
