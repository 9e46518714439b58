"""Prefect orchestration of the sweep: thin flows and tasks around ``bitsweep.sweep``'s steps.

This package's own module imports no Prefect, so a program can settle Prefect's settings first:
``prefect_environment()``, then ``from bitsweep.flows.sweep import run_sweeps``.
"""

import os


def prefect_environment() -> None:
    """Offline-safe Prefect settings (users' own settings win): call before Prefect is imported."""
    # Console logging is the progress bar and the results table; Prefect's logs still reach its API and UI.
    defaults = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
                "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
                "PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL": "CRITICAL",
                "PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL": "CRITICAL",
                "PREFECT_LOGGING_EXTRA_LOGGERS": "bitsweep"}  # e.g. synthetic data's progress, in its task's logs
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
