"""A study's units as Ray tasks: on an embedded local Ray (nothing to start) or an existing cluster (--address).

Each unit is one task with the CPUs and GPUs the study asks for (a fraction of a GPU lets several units share
one), running `units.run_unit` in a worker: the same code as the local backend, into the same run folder. A
worker that dies (killed, preempted, out of memory) is retried by Ray up to `retries` times, and the retry
resumes the unit from its run folder; an exception other than a user's mistake is retried the same way. Two
units that need the same base stage at once compute it once (base_cache's file lock): run folders and the
cache must be on a filesystem every worker sees, as they are on one machine.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable

from lorawatch.errors import UserError
from lorawatch.study.folder import read_status, write_status
from lorawatch.study.spec import StudyPlan, Unit
from lorawatch.study.units import pending_units, run_unit, unit_threads

# What a worker must see as the driver does: the caches, the data folder, and the test-only fault injection.
FORWARDED_ENV = ("LORAWATCH_CACHE", "LORAWATCH_BASE_STAGE_CACHE", "LORAWATCH_DATA", "LORAWATCH_CRASH_AT",
                 "LORAWATCH_PAUSE_AT", "LORAWATCH_PAUSE_SECONDS", "LORAWATCH_PAUSE_FILE", "HF_HOME")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'lorawatch[ray]' (or use --backend local)") from None
    return ray


def _check_reachable(address: str) -> None:
    """A HOST:PORT that nothing answers on is one line now: Ray itself would keep trying to connect for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # `auto`, ray:// and the like: Ray's own resolution
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError(f"--address {address}: no Ray cluster answers there ({error.strerror or error}); start one "
                        "with `ray start --head` on that machine, or leave --address out for an embedded Ray") \
            from None


def _unit_task(unit: Unit, study_dir: str, threads: int) -> dict:
    """In the worker: one unit, its output into DIR/logs/<unit>.log."""
    import warnings

    import torch
    from rich.console import Console

    from lorawatch.errors import format_warning

    warnings.formatwarning = format_warning  # a worker does not run the command line's main()
    torch.set_num_threads(threads)
    log = Path(study_dir) / "logs" / f"{unit.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle:
        console = Console(file=handle, width=120, force_terminal=False)
        return run_unit(unit, Path(study_dir), console=console)


def run_on_ray(study: StudyPlan, study_dir: Path, *, address: str | None, workers: int | None, console,
               on_unit: Callable[[Unit, dict], None]) -> None:
    """Submit every unfinished unit and collect them as they finish."""
    ray = import_ray()
    resources = study.spec.resources
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
               "runtime_env": {"env_vars": env}}
    if address is None:
        # An embedded Ray of its own ("local": never the cluster a `ray start` on this machine left running), sized
        # for `workers` units at once (default: as many as this machine's CPUs allow).
        options["address"] = "local"
        # Ray runs its workers at nice 15 (for the driver's sake); here the workers are the study, and at nice 15
        # anything else on the machine (a test run, an editor's indexer) takes their CPU: measured, it doubled a
        # study's time. A cluster of the user's own (--address) keeps its settings.
        options["_system_config"] = {"worker_niceness": 0}
        if workers is not None:
            options["num_cpus"] = workers * (resources.cpus or 1)
        started = "an embedded local Ray"
    else:
        options["address"] = address
        started = f"the Ray cluster at {address}"
    todo = pending_units(study, study_dir)
    if not todo:
        return
    if address is not None:
        _check_reachable(address)
    try:
        ray.init(**options)
    except ConnectionError as error:
        raise UserError(f"--address {address}: cannot connect to a Ray cluster there ({error}); a cluster started "
                        "with token authentication (the default of `ray start` since Ray 2.59) also needs "
                        "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token) here") from None
    try:
        total = ray.cluster_resources()
        console.print(f"[bold]study[/bold] {study.name}: {len(todo)} units on {started} "
                      f"({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs; each unit {resources.cpus or 1:g} "
                      f"CPU, {resources.gpus:g} GPU); logs in {study_dir / 'logs'}")
        cpus = resources.cpus or 1
        task = ray.remote(_unit_task).options(num_cpus=cpus, num_gpus=resources.gpus,
                                             max_retries=study.spec.retries, retry_exceptions=True)
        threads = unit_threads(resources, 1)
        for unit in todo:
            write_status(study_dir, unit.name, state="queued", queued=time.time())
        running = {task.remote(unit, str(study_dir), threads): unit for unit in todo}
        while running:
            finished, _ = ray.wait(list(running), num_returns=1)
            unit = running.pop(finished[0])
            try:
                status = ray.get(finished[0])
            except ray.exceptions.RayError as error:
                # retries spent: the last error is in the unit's log and status file
                status = read_status(study_dir, unit.name)
                if status.get("state") != "failed":
                    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    status = write_status(study_dir, unit.name, state="failed", finished=time.time(),
                                          error=f"{type(error).__name__}: {line}")
            on_unit(unit, status)
    finally:
        ray.shutdown()
