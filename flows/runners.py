"""The task runner a sweep's cells run on, chosen by flows.yaml's ``runner:`` (or ``bitsweep run`` options):
threads in the flow's process, or Dask — the scheduler at ``address``, else a LocalCluster on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner, TaskRunner
from pydantic import ValidationError

from bitsweep.config import Runner
from bitsweep.errors import BitsweepError, first_line

CONNECT_SECONDS = 5  # an unreachable scheduler is reported after this long


def settings(base: Runner, kind: str | None = None, address: str | None = None,
             workers: int | None = None) -> Runner:
    """flows.yaml's runner with command-line or deployment overrides (an address implies Dask); a bad
    override is one line naming its ``bitsweep run`` option."""
    changes = {"kind": kind or ("dask" if address else None), "address": address, "workers": workers}
    try:
        return Runner.model_validate(base.model_dump() | {k: v for k, v in changes.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = error["loc"][0] if error["loc"] else "kind"
        option = {"kind": "--runner", "address": "--address", "workers": "--max-workers"}[field]
        raise BitsweepError(f"{option}: {error['msg'].removeprefix('Value error, ')}") from None


def check_scheduler(address: str) -> None:
    """Fail fast, in one line, unless a Dask scheduler answers at ``address``."""
    from distributed.comm.addressing import parse_address, parse_host_port

    quiet = logging.getLogger("distributed")
    level, quiet.level = quiet.level, logging.CRITICAL  # its connection retries would each log a warning
    try:
        protocol, location = parse_address(address)
        if protocol in ("tcp", "tls"):  # a refused port is known at once; Dask would retry it until the timeout
            socket.create_connection(parse_host_port(location), timeout=CONNECT_SECONDS).close()
        identity = asyncio.run(asyncio.wait_for(_identity(address), CONNECT_SECONDS))  # whatever answers
    except (OSError, TimeoutError) as exc:
        reason = first_line(exc) or f"no reply in {CONNECT_SECONDS} s"
        raise BitsweepError(f"no Dask scheduler answers at {address} ({reason}); start one with "
                            f"`dask scheduler` or fix runner.address / --address") from None
    except Exception as exc:  # e.g. an HTTP server: its reply read as a Dask frame can be any size
        identity = {"type": f"a reply Dask cannot read ({type(exc).__name__})"}
    finally:
        quiet.level = level
    if not isinstance(identity, dict) or identity.get("type") != "Scheduler":
        found = identity.get("type") if isinstance(identity, dict) else type(identity).__name__
        raise BitsweepError(f"{address} is not a Dask scheduler (it sent {found}); give the scheduler's address "
                            f"in runner.address / --address")


async def _identity(address: str):
    """What the server at ``address`` says it is, over Dask's own protocol."""
    from distributed.comm import connect

    comm = await connect(address, timeout=CONNECT_SECONDS)
    try:
        await comm.write({"op": "identity", "reply": True})
        return await comm.read()
    finally:
        comm.abort()


def task_runner(runner: Runner, threads: int) -> TaskRunner:
    """A fresh task runner; ``threads`` is the torch threads each cell uses, which sets the default width."""
    workers = runner.workers or max(1, (os.cpu_count() or 1) // threads)
    if runner.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise BitsweepError("runner kind dask needs prefect-dask; install it with "
                            "`pip install 'bitsweep[dask]'`") from None
    if runner.address:
        check_scheduler(runner.address)
        return DaskTaskRunner(address=runner.address)
    # One cell per worker process at a time, each with the sweep's torch threads; every port on loopback.
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",
                                          "env": {"OMP_NUM_THREADS": str(threads)}})


@contextlib.contextmanager
def running_on(runner: TaskRunner):
    """Submit the current flow's tasks to ``runner``: a flow's own runner is fixed where it is declared,
    while a sweep's comes from its flows.yaml, read inside the flow (also in scheduled runs).

    Tasks in other processes are sent the flow's settings: with no PREFECT_API_URL, that is the address
    of the flow's temporary server, so they do not each start one of their own and lose their runs.
    """
    context = FlowRunContext.get()
    with get_client(sync_client=True) as client:
        api = PREFECT_API_URL.value() or str(client.api_url)
    with temporary_settings({PREFECT_API_URL: api}), runner, context.model_copy(update={"task_runner": runner}):
        yield runner
