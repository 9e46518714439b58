"""Prefect orchestration of the sweep: thin flows and tasks around ``bitsweep.sweep``."""
