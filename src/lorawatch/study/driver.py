"""The `lorawatch study` command: plan the units, run the unfinished ones on a backend, write the report;
and `lorawatch study status`, a table of every unit's state."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorawatch.rundir import atomic
from lorawatch.config import TrackingSettings
from lorawatch.study.folder import study_states, write_plan
from lorawatch.study.spec import StudyPlan, Unit, load_study_file
from lorawatch.study.units import pending_units, run_local, unit_finished


def run_study(study_file: Path, out: Path | None, *, backend: str, address: str | None, workers: int | None,
              plan: bool, as_html: bool, console: Console, report_dir: Path | None = None,
              track: str | None = None) -> int:
    """Exit code: 0 when every unit finished and the report is written, 1 when a unit failed."""
    study = load_study_file(study_file)
    study_dir = out or Path("runs") / study.name
    tracking = study.spec.tracking
    if track is not None and (tracking is None or tracking.backend != track):
        tracking = TrackingSettings(backend=track)
    units_file = write_plan(study, study_dir)
    if plan:
        console.print(f"study {study.name}: {len(study.units)} units, one `lorawatch run` line each, in {units_file}; "
                      f"when they have run, `lorawatch study {study_file} --out {study_dir}` writes the report")
        print(units_file)
        return 0
    todo = pending_units(study, study_dir)
    done_before = len(study.units) - len(todo)
    console.print(f"[bold]study[/bold] {study.name}: {len(study.units)} units, {done_before} finished before, "
                  f"{len(todo)} to run ({backend}); folder {study_dir}")
    parent = None if tracking is None else StudyTracker(study, study_dir, tracking)
    report = _unit_reporter(study, len(todo), console)
    failed_now: dict[str, str] = {}  # the units that failed in this invocation, with their errors

    def on_unit(unit: Unit, status: dict) -> None:
        report(unit, status)
        if status.get("state") != "done":
            failed_now[unit.name] = status.get("error") or "no error recorded"
        if parent is not None and status.get("state") == "done":
            parent.unit(unit)

    if backend == "ray":
        from lorawatch.study.ray_backend import run_on_ray

        # Ray's workers do not log: the study's store may be a SQLite file, with one writer (this process)
        run_on_ray(study, study_dir, address=address, workers=workers, console=console, on_unit=on_unit)
    else:
        run_local(study, study_dir, console=console, on_unit=on_unit,
                  tracking=None if parent is None else parent.settings,
                  tracking_parent=None if parent is None else parent.tracker.run_id)
    code = _finish(study, study_dir, study_file, report_dir or study_dir / "report", as_html, console, parent,
                   failed_now)
    if parent is not None:
        console.print(f"study {study.name}: logged to {parent.tracker.where}")
    return code


class StudyTracker:
    """The study as a parent tracker run (reopened by a rerun, from DIR/tracking.json); its units as children,
    logged live on the local backend and exported by this process when they finish on Ray."""

    def __init__(self, study: StudyPlan, study_dir: Path, settings: TrackingSettings):
        from lorawatch.integrations.tracking import check_destination, open_parent, resolve

        check_destination(settings, study_dir)
        self.study_dir, self.settings = study_dir, resolve(settings, study_dir)
        record = study_dir / "tracking.json"
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or damaged: a new parent run
            recorded = {}
        recorded = recorded if isinstance(recorded, dict) else {}
        same = recorded.get("settings") == self.settings.model_dump(mode="json")
        self.tracker = open_parent(self.settings, study_dir, study.name,
                                   {"study": study.spec.model_dump(mode="json", exclude={"tracking"}),
                                    "units": len(study.units)},
                                   run_id=recorded.get("run_id") if same else None)
        atomic.write_text(record, json.dumps({"settings": self.settings.model_dump(mode="json"),
                                              "run_id": self.tracker.run_id}, indent=2) + "\n")

    def unit(self, unit: Unit) -> None:
        """A finished unit as a child (nothing is logged twice: its tracking.json says what was)."""
        from lorawatch.integrations.tracking import export_run

        export_run(unit.folder(self.study_dir), self.settings, home=self.study_dir, name=unit.name,
                   parent=self.tracker.run_id)

    def finish(self, study: StudyPlan, report_dir: Path | None, done: bool) -> None:
        for unit in study.units:
            if unit_finished(unit, self.study_dir):
                self.unit(unit)
        if report_dir is not None:
            for path in sorted(report_dir.glob("*.*")):
                if path.suffix in (".md", ".csv", ".png", ".json", ".html"):
                    self.tracker.log_artifact(path, "report")
        self.tracker.close("FINISHED" if done else "FAILED")


def _unit_reporter(study: StudyPlan, count: int, console: Console):
    """A line per finished unit: how far the study is and how long the rest should take."""
    started, finished = time.perf_counter(), [0]

    def on_unit(unit: Unit, status: dict) -> None:
        finished[0] += 1
        elapsed = time.perf_counter() - started
        left = (count - finished[0]) * elapsed / finished[0]
        state = status.get("state", "failed")
        what = (f"failed: {status.get('error') or 'no error recorded'}" if state != "done"
                else f"done in {_duration(status.get('seconds'))}")
        console.print(f"[bold]study[/bold] {study.name}: {unit.name} {what} · {finished[0]}/{count} · "
                      f"{_duration(elapsed)} elapsed" + (f", about {_duration(left)} left" if left else ""))

    return on_unit


def _finish(study: StudyPlan, study_dir: Path, study_file: Path, report_dir: Path, as_html: bool,
            console: Console, parent: StudyTracker | None, failed_now: dict[str, str]) -> int:
    """The report, over every unit, once every unit is finished with the config the study gives it; else which
    units are not (a unit that failed in this invocation never counts as finished, whatever its folder holds)
    and exit code 1, the report left as it was."""
    from lorawatch.report.study_report import write_report

    units = {unit.name: unit for unit in study.units}
    states = study_states(study_dir)
    failed = []
    for state in states:
        if state.name in failed_now:
            state.state, state.error = "failed", failed_now[state.name]
        elif state.state == "done" and not unit_finished(units[state.name], study_dir):
            state.state, state.error = "outdated", "run folder made with another config than the study gives the unit"
        if state.state != "done":
            failed.append(state)
    for state in failed:
        console.print(f"study {study.name}: unit {state.name} {state.state}"
                      + (f": {state.error}" if state.error else ""))
    if failed:
        stale = (f"; {report_dir / 'report.md'} is from an earlier run of the study and was not rewritten"
                 if (report_dir / "report.md").exists() else "")
        console.print(f"study {study.name}: {len(failed)} of {len(states)} units did not finish; the report waits "
                      f"for them{stale}: run `lorawatch study {study_file} --out {study_dir}` again to retry")
        if parent is not None:
            parent.finish(study, None, done=False)
        return 1
    report = write_report([s.folder for s in states], report_dir)
    print(report.out / "report.md")
    if as_html:
        from lorawatch.report.html import write_report_html

        print(write_report_html(report, report.out / "report.html"))
    if parent is not None:
        parent.finish(study, report.out, done=True)
    return 0


def print_status(study_dir: Path, console: Console) -> int:
    """The units' table; exit code 1 when a unit failed or its run folder is of another config (outdated)."""
    states = study_states(study_dir)
    table = Table(title=f"study {study_dir}", title_justify="left")
    for column in ("unit", "state", "stages", "time", "attempts", "error"):
        table.add_column(column, justify="right" if column in ("stages", "time", "attempts") else "left")
    styles = {"done": "green", "running": "cyan", "failed": "red", "outdated": "magenta", "interrupted": "yellow",
              "waiting": "dim"}
    for s in states:
        table.add_row(s.name, f"[{styles[s.state]}]{s.state}[/]", "-" if s.stages is None else "%d/%d" % s.stages,
                      _duration(s.seconds), str(s.attempts or "-"), s.error or "")
    console.print(table)
    counts = {state: sum(s.state == state for s in states) for state in styles}
    console.print(" · ".join(f"{n} {state}" for state, n in counts.items() if n))
    return 1 if counts["failed"] or counts["outdated"] else 0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        (f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")
