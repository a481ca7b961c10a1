"""hpcserve: serve LLMs from a Slurm GPU cluster behind one OpenAI-compatible HAProxy endpoint."""

__version__ = "0.1.0"
