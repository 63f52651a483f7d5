"""Peer servers (FastAPI, LitServe): scripts run by `benchmarks/.venv/bin/python`, plus `env` that makes that venv."""
