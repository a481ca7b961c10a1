"""The llama.cpp llama-server adapter: probing backends (probe.py) and its test double, the
simulator (simulator.py, the hpcserve-llama-sim command)."""
