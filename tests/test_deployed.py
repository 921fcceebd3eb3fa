"""The deployed form through llama.cpp (`lorawatch deploy`, the config's deploy section): a tiny random Llama trained
for two stages, each checkpoint merged, converted and quantized by llama.cpp and run by its runtime, no part mocked.
Needs llama-cpp-python and llama.cpp's converter (`make deploy` installs both); without them these tests skip and
say so."""

from __future__ import annotations

import json

import pytest

from tiny import assert_one_line_error, cli, config_file, needs_llama_cpp, tiny_config, write_task_files
from lorawatch.rundir import schema
from lorawatch.rundir.layout import RunFolder

needs_llama_cpp()

SEED = 3
FORMATS = ("f16", "q4_k_m")
STAGES = (0, 1, 2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A run whose config has a deploy section: `lorawatch run` measures the deployed forms after its last stage."""
    from lorawatch.config import build_config
    from lorawatch.recipe.run import run_experiment

    root = tmp_path_factory.mktemp("deployed")
    write_task_files(root / "data")
    config = tiny_config(tiny_model_dir, root / "data", seeds=(SEED,))
    config = build_config({**config.model_dump(mode="json", exclude_unset=True), "deploy": {"formats": list(FORMATS)}})
    return run_experiment(config, root / "run")


def _form(run_dir, stage, fmt):
    return RunFolder(run_dir).stage(SEED, stage).deployed(fmt)


def test_the_run_records_every_form_and_they_read_back(run_dir):
    from lorawatch.rundir.check import check_run_folder

    for k in STAGES:
        stage = RunFolder(run_dir).stage(SEED, k)
        assert stage.deployed_formats() == sorted(FORMATS)
        for fmt in FORMATS:
            form = stage.deployed(fmt)
            record = form.record.read()
            assert (record.stage, record.format, record.checkpoint) == (k, fmt, stage.record.read().checkpoint)
            assert set(record.accuracy) == {"stance", "sum", "reference"} and record.file_bytes > 0
            assert [r.id for r in form.drift.read()] == [r.id for r in stage.drift.read()]
            for task in ("stance", "sum", "reference"):
                assert [p.id for p in form.predictions(task).read()] == [p.id for p in stage.predictions(task).read()]
    assert check_run_folder(run_dir) == []  # `lorawatch check` reads the new files against their schema
    for path in run_dir.rglob("deployed.json"):
        data = json.loads(path.read_text())
        assert list(data)[-1] == "schema_version" and data["schema_version"] == schema.SCHEMA_VERSION, path


def test_f16_gives_the_checkpoints_outputs_and_accuracy(run_dir):
    """At f16 this tiny model's outputs are the PyTorch checkpoint's token for token, so its deployed accuracy
    matrix is the PyTorch one, and the paired comparison finds no change."""
    from lorawatch.analysis.deployed import seed_results
    from lorawatch.config import StatisticsSettings

    for k in STAGES:
        stage = RunFolder(run_dir).stage(SEED, k)
        record = _form(run_dir, k, "f16").record.read()
        assert all(share == 1.0 for share in record.identical.values()), record.identical
        assert record.accuracy == stage.scores.read().accuracy()
        for task in ("stance", "sum"):
            ours = [(p.prediction, p.correct) for p in stage.predictions(task).read()]
            assert [(p.prediction, p.correct) for p in _form(run_dir, k, "f16").predictions(task).read()] == ours
        assert record.reference.same_top1 == 1.0 and record.reference.kl_reverse_max < 1e-3
    for result in seed_results(run_dir, SEED, StatisticsSettings()):
        if result.format == "f16":
            assert all(t.difference == 0 and t.verdict == "no detectable change" for t in result.tasks)
            assert (result.base is None) == (result.stage == 0)


def test_a_4_bit_form_drifts_more_than_f16(run_dir):
    for k in STAGES:
        f16, q4 = (_form(run_dir, k, fmt).record.read().reference for fmt in ("f16", "q4_k_m"))
        print(f"stage {k}: KL(checkpoint ‖ deployed) f16 {f16.kl_reverse_mean:.2e}, q4_k_m {q4.kl_reverse_mean:.2e}")
        assert q4.kl_reverse_mean > 10 * f16.kl_reverse_mean and q4.kl_mean > 10 * f16.kl_mean


def test_resume_skips_finished_work_and_redoes_only_what_is_missing(run_dir):
    from lorawatch.deploy.deployed import plan_deployed

    form = _form(run_dir, 1, "q4_k_m")
    kept = form.predictions("stance").path
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert plan_deployed(run_dir, list(FORMATS)).work == ()
    result = cli("deploy", run_dir, "--formats", ",".join(FORMATS))
    assert result.returncode == 0, result.stderr
    assert "already evaluated" in result.stderr
    assert len(result.stdout.strip().splitlines()) == len(STAGES) * len(FORMATS)  # a line per form
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
    # a form interrupted after its first task: only it is redone, and its finished task is read back
    record = form.record.read()
    form.record.path.unlink()
    plan = plan_deployed(run_dir, list(FORMATS))
    assert [(w.stage, w.formats) for w in plan.work] == [(1, ("q4_k_m",))]
    result = cli("deploy", run_dir, "--formats", ",".join(FORMATS), "--stages", "1")
    assert result.returncode == 0, result.stderr
    assert form.record.read().accuracy == record.accuracy
    assert kept.stat().st_mtime_ns == before[kept]


def test_the_gate_limits_the_deployed_kl(run_dir):
    q4 = _form(run_dir, 2, "q4_k_m").record.read().reference.kl_reverse_mean
    failed = cli("gate", run_dir, "--against", "base", "--max-deploy-kl", f"{q4 / 2:g}")
    assert failed.returncode == 2, failed.stderr
    reasons = [line for line in failed.stdout.splitlines() if line.startswith("reason: ")]
    assert any("deployed q4_k_m KL(checkpoint ‖ deployed)" in r and "--max-deploy-kl" in r for r in reasons), reasons
    assert not any("deployed f16" in r for r in reasons)
    passed = cli("gate", run_dir, "--against", "base", "--max-deploy-kl", "10")
    assert "--max-deploy-kl" not in passed.stdout


def test_report_and_html_show_the_deployed_section(run_dir, tmp_path):
    from lorawatch.report.html import write_run_html
    from lorawatch.report.study_report import write_report

    write_report([run_dir], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    section = text.split("## Deployed form (llama.cpp)", 1)[1].split("\n## ", 1)[0]
    assert "| sum | q4_k_m | stance |" in section and "| base | f16 |" in section
    assert (tmp_path / "report" / "deployed.csv").is_file()
    page = write_run_html(run_dir, tmp_path / "run.html").read_text()
    assert 'id="deployed"' in page and "KL(ckpt ‖ deployed)" in page


def test_bad_input_is_one_line(run_dir, tmp_path, tiny_model_dir):
    assert_one_line_error(cli("deploy", run_dir, "--formats", "f16,q9"), "--formats", "'q9'")
    assert_one_line_error(cli("deploy", run_dir, "--stages", "7"), "--stages", "stage 7")
    assert_one_line_error(cli("deploy", tmp_path), "not a lorawatch run folder")
    assert_one_line_error(cli("run", config_file(tmp_path, tiny_model_dir, deploy={"formats": ["q9"]}),
                              "--out", tmp_path / "run"), "deploy.formats", "'q9'")


def test_a_resumed_run_may_add_change_or_drop_the_deploy_section(run_dir):
    """The deployed forms change none of the run's PyTorch results: like tracking, deploy is no config change."""
    from lorawatch.config import build_config
    from lorawatch.report.tables import load_run_config
    from lorawatch.rundir.lifecycle import config_changes

    recorded = load_run_config(run_dir).model_dump(mode="json", exclude_unset=True)
    for deploy in (None, {"formats": ["q8_0"]}):
        assert config_changes(run_dir, build_config({**recorded, "deploy": deploy})) == []


def test_an_exported_stage_s_card_shows_its_deployed_forms(run_dir, tmp_path):
    """`lorawatch export` of a stage that `lorawatch deploy` measured: the model card carries each deployed form's
    accuracy and drift from the checkpoint, in the body and in the model-index metadata, as deployed.json has them."""
    import yaml

    out = tmp_path / "exported"
    result = cli("export", run_dir, "--seed", SEED, "--stage", 1, "--out", out)
    assert result.returncode == 0, result.stderr
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    body = text[text.index("## Measured as deployed"):]
    metrics = {m["type"]: m["value"] for r in meta["model-index"][0]["results"]
               if r["dataset"]["name"] == "reference set" for m in r["metrics"]}
    for fmt in FORMATS:
        record = _form(run_dir, 1, fmt).record.read()
        assert metrics[f"{fmt}_deployed_kl_mean"] == round(record.reference.kl_mean, 6)
        assert metrics[f"{fmt}_deployed_same_top1"] == round(record.reference.same_top1, 4)
        row = next(line for line in body.splitlines() if line.startswith(f"| {fmt} |"))
        assert f"stance {record.accuracy['stance']:.3f}" in row and f"{record.reference.kl_mean:.2e}" in row
        deployed_accuracy = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]
                             if r["task"]["name"] == f"continual learning, {fmt} under llama.cpp"}
        assert deployed_accuracy == {t: round(record.accuracy[t], 4) for t in ("stance", "sum")}
