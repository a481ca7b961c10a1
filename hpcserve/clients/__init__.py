"""Clients of the pool that hpcserve runs: bulk inference (`batch`) and OpenWebUI."""
