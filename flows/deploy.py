"""flows.yaml's deployments, registered with the Prefect server at ``PREFECT_API_URL``.

Each runs the sweep flow from the installed package (a module-path entrypoint: no git remote,
no image) on a work pool — by default a local process pool, created if missing, whose worker runs
it in the folder ``bitsweep deploy`` ran from, where ``bitsweep run`` would have put the results.
"""

from __future__ import annotations

from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.workers.process import ProcessWorker

from bitsweep.config import load_config
from bitsweep.errors import BitsweepError, first_line
from bitsweep.flows.sweep import sweep_flow

POOL = "bitsweep"
SET_BY_BITSWEEP = ("config_path", "sweep_name")  # from the deployment's file and its `sweep:` key


def _server() -> str:
    url = PREFECT_API_URL.value()
    if not url:
        raise BitsweepError("PREFECT_API_URL is not set; start a server with `bitsweep server` and export the "
                            "PREFECT_API_URL it prints")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem:
        raise BitsweepError(f"no Prefect server answers at {url} ({first_line(problem)}); start one with "
                            f"`bitsweep server` or fix PREFECT_API_URL")
    return url


def ensure_pool(name: str) -> str:
    """The work pool ``name``'s type; a missing pool is created as a local process pool."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return "process"


def deploy(config_path: Path, pool: str = POOL) -> list[str]:
    """Register (or update) every deployment of the file; their names as ``flow/deployment``."""
    config = load_config(config_path)
    if not config.deployments:
        raise BitsweepError(f"{config_path}: deployments: none listed; add one with a name, a sweep and a cron "
                            f"schedule (see the README's \"Scheduled sweeps\")")
    known = set(sweep_flow.parameters.properties) - set(SET_BY_BITSWEEP)
    for i, entry in enumerate(config.deployments):
        unknown = sorted(set(entry.parameters) - known)
        if unknown:
            raise BitsweepError(f"{config_path}: deployments[{i}].parameters: unknown {', '.join(unknown)}; "
                                f"available: {', '.join(sorted(known))}")
    _server()
    # A process pool runs flows here, in this folder; another pool type (kubernetes, docker...) runs them
    # in its own job's image, which must have bitsweep installed (see the README).
    job_variables = {"working_dir": str(Path.cwd())} if ensure_pool(pool) == "process" else {}
    names = []
    for entry in config.deployments:
        deployment = sweep_flow.to_deployment(
            name=entry.name, cron=entry.cron, entrypoint_type=EntrypointType.MODULE_PATH, work_pool_name=pool,
            parameters={"config_path": str(Path(config_path).resolve()), "sweep_name": entry.sweep,
                        **entry.parameters},
            job_variables=job_variables, description=f"sweep {entry.sweep}, cron {entry.cron}")
        try:
            deployment.apply()
        except Exception as exc:  # the server refused it: say why in one line
            raise BitsweepError(f"deployment {entry.name!r} was not registered: {first_line(exc)}") from None
        names.append(f"{sweep_flow.name}/{entry.name}")
    return names
