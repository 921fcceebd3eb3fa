"""What each file of a run folder holds, as typed records: checked when written and when read back.

Every JSON record carries `schema_version` (its last key). A JSON Lines file's rows follow the version of the
record beside them (a stage's predictions, drift and monitor series: its stage.json; the histories: the run's
inputs.json); the CSV tables follow their seed's cl_metrics.json and the summary's summary.json. config.json is
the resolved config, checked by the config schema itself (`config.ExperimentConfig`).

Version 0 is a folder written before records were versioned (no `schema_version` key): it reads the same,
since version 1 only added the key. Version 2 added seed-S/statistics.json and the seed intervals of summary.json
(`ci_low`, `ci_high`); a version-1 folder has neither, and its statistics are computed from its predictions when
they are asked for (verdicts.load_seed_statistics). Version 3 added the drift statistics of engine/drift_stats.py to
each reference_drift.jsonl row (`kl_forward`, `same_top1`, `top5_overlap`, `dp_gold`), a stage's task_drift.jsonl
(drift on the trained task's own test prompts), the monitor's `signal` and every signal of its measurements, and
stage.json's `adapter_check`; older files read with those as None. Within version 3, a stage may also hold
span_drift.jsonl (drift over the first tokens of an answer, `SpanDrift`), absent from older folders. A record from a newer lorawatch is refused with a
line saying so, never mistaken for a damaged file (which a run would recompute).

Bump SCHEMA_VERSION when a record changes meaning or shape, and teach `store.read_record` to read the old one.

The records are split by what they describe: base.py (Part, Record, the version), stage.py (a stage's files), run.py
(the run's own files), tables.py (the per-seed and summary tables), statistics.py (seed-S/statistics.json),
deployed.py (a stage's deployed forms: optional files added within schema 3, absent from older folders). Which
file holds which record is layout.py's (`RECORDS`).
"""

from lorawatch.rundir.schema.base import SCHEMA_VERSION, Part, Record  # noqa: F401
from lorawatch.rundir.schema.stage import (  # noqa: F401
    Intervention,
    MonitorLog,
    ReplayLog,
    StrategyLog,
    TrainingLog,
    TrainingRecord,
    AdapterCheck,
    StageRecord,
    Scores,
    ReferenceStats,
    MonitorPoint,
    FiniteFloat,
    ExampleDrift,
    SpanDrift,
)
from lorawatch.rundir.schema.run import (  # noqa: F401
    GenerationCounts,
    FastPathRecord,
    CostsRecord,
    MonitorParamsRecord,
    Calibration,
    MonitorRecord,
    TaskInputs,
    DataInputs,
    AdapterInput,
    Inputs,
    Environment,
    EnvironmentEntry,
    ConfigChange,
    TrackingDestination,
    TrackedRun,
    TrackingRecord,
)
from lorawatch.rundir.schema.tables import (  # noqa: F401
    TABLE_COLUMNS,
    CheckpointMetrics,
    ClMetricsRecord,
    MeanStd,
    Summary,
)
from lorawatch.rundir.schema.deployed import DeployedDrift, DeployedDriftSummary, DeployedRecord  # noqa: F401
from lorawatch.rundir.schema.statistics import (  # noqa: F401
    Probability,
    Difference,
    StatisticsParams,
    AccuracyInterval,
    TaskComparison,
    Comparison,
    Interval,
    MetricInterval,
    DetectableDrop,
    StatisticsRecord,
)
