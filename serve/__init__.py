"""The Dispider server: an OpenAI-compatible API over the sidecar (perception, decision) and the vLLM
reaction engine. Start it with ``dispider-serve`` or ``python -m serve``; see :mod:`serve.app` for the routes."""
