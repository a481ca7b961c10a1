"""The llama.cpp llama-server adapter: probing backends over HTTP (probe.py), the builds and what
differs between them (builds.py), whether a server may serve (props.py), and its test double, the
simulator (simulator.py, the hpcserve-llama-sim command)."""
