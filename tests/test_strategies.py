"""The `strategy` section: `none` is the plain protocol byte for byte, and each strategy's mechanism on
the tiny model: replay's rows and seeds, the KL anchor's term, EWC's Fisher and penalty, the merges of per-task
adapters (PEFT's linear, TIES and DARE, and MagMax) against hand-computed tensors, O-LoRA's penalty and frozen
adapters."""

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import assert_one_line_error, assert_same_results, cli, config_file, tiny_config, write_task_files
from lorawatch.rundir.layout import EWC_FISHER, TASK_ADAPTER, RunFolder
from lorawatch.rundir.check import check_run_folder
from lorawatch.config import build_config
from lorawatch.errors import ConfigError, UserError
from lorawatch.data.prompts import encode_train_example
from lorawatch.recipe.lora import lora_config
from lorawatch.recipe.run import run_experiment
from lorawatch.report.study import _protocol_fingerprint, _variant_labels, load_study
from lorawatch.rundir.lifecycle import config_changes
from lorawatch.recipe.strategies.ewc import diagonal_fisher, ewc_penalty, trainable_parameters
from lorawatch.recipe.strategies.kl_anchor import kl_to_base
from lorawatch.recipe.strategies.adapters import reset_adapter
from lorawatch.recipe.strategies.merging import magmax, magmax_states, peft_merge
from lorawatch.recipe.strategies.olora import OLoRA, olora_penalty
from lorawatch.recipe.strategies.replay import Replay, replay_rows
from lorawatch.recipe.training import TrainParams, _collate, answer_loss, train_stage


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("strategies")
    write_task_files(folder / "data")
    return folder


def _config(model_dir, root, strategy=None):
    data = tiny_config(model_dir, root / "data", seeds=(1,)).model_dump(mode="json")
    if strategy is None:
        del data["strategy"]  # a config written before the section existed
    else:
        data["strategy"] = strategy
    return build_config(data)


# The tiny runs the tests read, by name ("plain": a config without the section).
STRATEGIES = {
    "plain": None,
    "none": {"name": "none"},
    "replay": {"name": "replay", "count": 3},
    "kl_anchor": {"name": "kl_anchor", "weight": 20.0},
    "ewc": {"name": "ewc", "weight": 1000.0, "fisher_rows": 5},
    "magmax": {"name": "merge", "method": "magmax"},
    "linear": {"name": "merge", "method": "linear"},
    "olora": {"name": "olora", "lambda_orth": 50.0, "lambda_l2": 0.0},
}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, root):
    """The run folder of one of STRATEGIES, made when first asked for."""
    made = {}

    def run(name):
        if name not in made:
            made[name] = run_experiment(_config(tiny_model_dir, root, STRATEGIES[name]), root / name)
        return made[name]

    return run


def _training(run_dir, stage):
    return json.loads((RunFolder(run_dir).stage(1, stage).path / "training.json").read_text())


def _peft_model(model_dir, seed=0):
    torch.manual_seed(seed)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                     task_type="CAUSAL_LM"))


def _rows(model_dir, n):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answers = ["A", "42", "B and C", "7"]
    return tokenizer, [encode_train_example(tokenizer, f"Question {i}: what is it?", answers[i % 4], 512)
                       for i in range(n)]


# --- the section and `none` ------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, fragments", [
    ({"name": "replay"}, ["field 'strategy'", "exactly one of 'fraction' or 'count'"]),
    ({"name": "replay", "fraction": 0.5, "count": 2}, ["field 'strategy'", "exactly one of"]),
    ({"name": "replay", "fraction": 1.5}, ["field 'strategy.fraction'", "less than or equal to 1"]),
    ({"name": "replay", "count": 2, "weight": 1.0}, ["'weight' is not a setting of strategy 'replay'"]),
    ({"name": "kl_anchor", "weight": -1}, ["field 'strategy.weight'", "greater than 0"]),
    ({"name": "ewc"}, ["strategy 'ewc' needs 'weight'"]),
    ({"name": "merge", "method": "ties"}, ["merge method 'ties' needs 'density'"]),
    ({"name": "dropout"}, ["field 'strategy.name'", "'dropout'"]),
    ({"fraction": 0.1}, ["'fraction' is not a setting of strategy 'none'"]),
])
def test_bad_strategy_settings_name_the_field(tiny_model_dir, root, strategy, fragments):
    with pytest.raises(ConfigError) as error:
        _config(tiny_model_dir, root, strategy)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# config.json as runs have recorded the section since strategies were added: every strategy's settings side by side,
# null where not the strategy's, in this order.
RECORDED = {"name": None, "fraction": None, "count": None, "weight": None, "fisher_rows": None, "method": None,
            "density": None, "lambda_orth": None, "lambda_l2": None}


@pytest.mark.parametrize("given, settings", [
    ({"name": "none"}, {}),
    ({"name": "replay", "fraction": 0.25}, {"fraction": 0.25}),
    ({"name": "kl_anchor"}, {"weight": 1.0}),
    ({"name": "ewc", "weight": 10}, {"weight": 10.0, "fisher_rows": 64}),
    ({"name": "merge"}, {"method": "linear"}),
    ({"name": "olora"}, {"lambda_orth": 0.5, "lambda_l2": 0.0}),
])
def test_the_section_is_recorded_byte_for_byte_as_before(tiny_model_dir, root, given, settings):
    config = _config(tiny_model_dir, root, given)
    recorded = {**RECORDED, "name": given["name"], **settings}
    assert json.dumps(config.model_dump(mode="json")["strategy"]) == json.dumps(recorded)
    assert _config(tiny_model_dir, root, recorded).strategy == config.strategy  # and reads back


def test_per_task_adapters_need_lora_without_bias(tiny_model_dir, root):
    data = _config(tiny_model_dir, root, {"name": "olora"}).model_dump(mode="json")
    data["lora"]["bias"] = "all"
    with pytest.raises(ConfigError, match="strategy 'olora' trains one adapter per task and needs lora.bias 'none'"):
        build_config(data)


def test_defaults_are_recorded_and_a_bad_setting_is_one_line_on_the_command_line(tiny_model_dir, root, tmp_path):
    assert _config(tiny_model_dir, root).strategy.name == "none"
    kl = _config(tiny_model_dir, root, {"name": "kl_anchor"}).strategy
    assert kl.model_dump(exclude_none=True) == {"name": "kl_anchor", "weight": 1.0}
    ewc = _config(tiny_model_dir, root, {"name": "ewc", "weight": 10}).strategy
    assert (ewc.weight, ewc.fisher_rows) == (10.0, 64)
    path = config_file(tmp_path, tiny_model_dir, strategy={"name": "kl_anchor", "count": 3})
    assert_one_line_error(cli("run", path, "--out", tmp_path / "never"), "config.json", "field 'strategy'",
                          "'count' is not a setting of strategy 'kl_anchor'")
    assert not (tmp_path / "never").exists()


def test_strategy_none_is_the_plain_protocol(runs):
    plain = runs("plain")  # a config without the section
    explicit = runs("none")
    assert_same_results(explicit, plain)
    for stage in (1, 2):
        logs = [_training(run, stage) for run in (plain, explicit)]
        assert "strategy" not in logs[0] and "extra_losses" not in logs[0]
        assert {k: v for k, v in logs[0].items() if k != "seconds"} == \
            {k: v for k, v in logs[1].items() if k != "seconds"}
        assert not (RunFolder(explicit).stage(1, stage).path / EWC_FISHER).exists()


def test_a_run_folder_from_before_the_section_resumes_but_a_strategy_change_is_refused(tiny_model_dir, root, runs):
    plain = runs("plain")
    old = root / "old-folder"
    shutil.copytree(plain, old)
    recorded = json.loads((old / "config.json").read_text())
    del recorded["strategy"]
    (old / "config.json").write_text(json.dumps(recorded))
    assert config_changes(old, _config(tiny_model_dir, root, {"name": "none"})) == []
    replay = _config(tiny_model_dir, root, {"name": "replay", "count": 2})
    with pytest.raises(UserError, match=r"--force cannot resume over .*strategy\.name"):
        run_experiment(replay, old, force=True)


def test_the_report_tells_strategies_apart(tiny_model_dir, root, runs):
    none = _protocol_fingerprint(_config(tiny_model_dir, root))
    replay = _protocol_fingerprint(_config(tiny_model_dir, root, {"name": "replay", "fraction": 0.25}))
    assert {k for k in none if none[k] != replay[k]} == {"strategy.name", "strategy.fraction"}
    study = load_study([runs("plain"), runs("replay")])
    assert len(study.groups) == 2  # same model and order: separate rows, labelled by what differs
    assert sorted(_variant_labels(study.groups).values()) == ["none", "strategy=replay(count=3)"]


def test_compare_shows_strategies_side_by_side_with_their_final_points(runs, tmp_path):
    from lorawatch.report.compare import compare_runs, write_comparison

    result = compare_runs([runs("plain"), runs("replay")])
    files = write_comparison(result, tmp_path)
    text = (tmp_path / "compare.md").read_text()
    assert "| strategy | none | replay (count 3) |" in text
    assert tmp_path / "figure3.png" in files and "![final accuracy against final KL](figure3.png)" in text


# --- replay ----------------------------------------------------------------------------------------------------

def test_replay_rows_counts_and_seeds():
    earlier = {"a": list(range(10)), "b": list(range(100, 103))}
    rows, taken = replay_rows(earlier, seed=7, count=4)
    assert taken == {"a": 4, "b": 3}  # b has fewer than 4: all of it
    assert rows[4:] == [100, 101, 102] and len(set(rows[:4])) == 4 and rows[:4] == sorted(rows[:4])
    assert replay_rows(earlier, seed=7, count=4) == (rows, taken)  # seeded
    assert any(replay_rows(earlier, seed=s, count=4)[0] != rows for s in range(8, 12))
    rows, taken = replay_rows(earlier, seed=7, fraction=0.25)
    assert taken == {"a": 2, "b": 1}  # round(2.5) = 2, round(0.75) = 1: at least one row per task
    # the draw comes from torch's generator with the seed: a task's sample is its permutation's first rows
    first = torch.randperm(10, generator=torch.Generator().manual_seed(7))[:2].sort().values.tolist()
    assert rows[:2] == first


def test_replay_plan_mixes_every_earlier_task(tmp_path):
    train_rows = {"a": list(range(10)), "b": list(range(10, 30)), "c": list(range(30, 35))}
    strategy = Replay(train_rows, fraction=0.5, count=None)
    plan = strategy.plan(None, 3, 3, [tmp_path] * 3)
    assert plan.rows[:5] == list(range(30, 35))  # the stage's own rows, all of them
    replayed = plan.rows[5:]
    assert len([r for r in replayed if r < 10]) == 5 and len([r for r in replayed if 10 <= r < 30]) == 10
    assert plan.record == {"replay": {"seed": 3003, "rows": {"a": 5, "b": 10}}}
    assert strategy.plan(None, 1, 3, [tmp_path]).record == {"replay": {"seed": 3001, "rows": {}}}


def test_replay_run_records_its_rows_per_stage(runs):
    run = runs("replay")
    first, second = _training(run, 1), _training(run, 2)
    assert first["strategy"] == {"name": "replay", "replay": {"seed": 1001, "rows": {}}}
    assert second["strategy"] == {"name": "replay", "replay": {"seed": 1002, "rows": {"stance": 3}}}
    # 8 rows of its own: 4 micro-batches of 2, and 2 steps of 2; with 3 replayed rows 6 micro-batches, 3 steps
    assert (first["micro_batches"], second["micro_batches"], second["optimizer_steps"]) == (4, 6, 3)
    # stage 1 trains exactly as the plain protocol does
    plain = _training(runs("plain"), 1)
    assert first["step_losses"] == plain["step_losses"]
    assert (RunFolder(run).stage(1, 1).path / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (RunFolder(runs("plain")).stage(1, 1).path / "adapter" / "adapter_model.safetensors").read_bytes()


# --- KL anchor -------------------------------------------------------------------------------------------------

def test_kl_term_is_zero_at_initialisation_and_has_a_gradient_after_a_step(tiny_model_dir):
    tokenizer, rows = _rows(tiny_model_dir, 4)
    model = _peft_model(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # a second copy, to check

    def kl_and_grad():
        inputs = _collate(rows, tokenizer.pad_token_id, "cpu")
        _, predicts, logits = answer_loss(model, inputs)  # takes the labels out of `inputs`, as in training
        kl = kl_to_base(model, inputs, predicts, logits)
        model.zero_grad(set_to_none=True)
        kl.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        # the same KL from the separate base model's logits
        with torch.no_grad():
            reference = torch.log_softmax(base(**inputs, logits_to_keep=predicts).logits, -1)
        expected = torch.nn.functional.kl_div(torch.log_softmax(logits.detach(), -1), reference,
                                              log_target=True, reduction="sum")
        return kl.item(), expected.item(), max(g.abs().max().item() for g in grads if g is not None)

    kl, expected, grad = kl_and_grad()
    # LoRA's B starts at zero: the adapted model is the base, at the KL's minimum (its gradient zero up to round-off)
    assert kl == 0.0 and expected == 0.0 and grad < 1e-6
    train_stage(model, rows, TrainParams(learning_rate=1e-2, batch_size=4, grad_accum=1, epochs=1,
                                         max_grad_norm=None, weight_decay=0.0),
                seed=1, pad_id=tokenizer.pad_token_id, device="cpu")
    kl, expected, grad = kl_and_grad()
    assert kl > 1e-4 and kl == pytest.approx(expected, rel=1e-4)
    assert grad > 1e-4


def test_kl_anchor_run_records_its_term_and_cost_and_holds_the_model_near_the_base(runs):
    anchored = runs("kl_anchor")
    first = _training(anchored, 1)
    assert first["extra_losses"][0] == 0.0  # the first step's gradient is computed at the base
    assert all(v > 0 for v in first["extra_losses"][1:]) and len(first["extra_losses"]) == first["optimizer_steps"]
    record = first["strategy"]
    assert record["name"] == "kl_anchor" and record["loss_seconds"] > 0
    assert record["loss_seconds_per_step"] == pytest.approx(record["loss_seconds"] / first["optimizer_steps"],
                                                            abs=1e-3)

    def reference_kl(run):
        return json.loads((RunFolder(run).stage(1, 2).path / "reference_stats.json").read_text())["kl_mean"]

    assert reference_kl(anchored) < reference_kl(runs("plain"))


# --- EWC -------------------------------------------------------------------------------------------------------

def test_ewc_penalty_by_hand():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    anchor = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([[1.5]])}
    fisher = {"a": torch.tensor([3.0, 100.0]), "b": torch.tensor([[2.0]])}
    # 4/2 * (3 * 1^2 + 100 * 0^2 + 2 * 1^2) = 10
    assert ewc_penalty(params, fisher, anchor, weight=4.0).item() == pytest.approx(10.0)


def test_diagonal_fisher_is_the_mean_squared_per_row_gradient(tiny_model_dir):
    tokenizer, rows = _rows(tiny_model_dir, 3)
    model = _peft_model(tiny_model_dir)
    with torch.no_grad():  # away from LoRA's initialisation, where B = 0 makes every gradient of A zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    fisher = diagonal_fisher(model, rows, pad_id=tokenizer.pad_token_id, device="cpu")
    assert all(p.grad is None for p in model.parameters())

    reference = copy.deepcopy(model)  # by hand: transformers' own mean loss, one row at a time
    expected = {n: torch.zeros_like(p) for n, p in trainable_parameters(reference).items()}
    for row in rows:
        reference.zero_grad()
        reference(**_collate([row], tokenizer.pad_token_id, "cpu")).loss.backward()
        for name, p in trainable_parameters(reference).items():
            expected[name] += p.grad ** 2 / len(rows)
    assert fisher.keys() == expected.keys() and any("lora_A" in k for k in fisher)
    for name in fisher:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-12)
    assert all(f.sum() > 0 for f in fisher.values())


def test_ewc_run_saves_the_fisher_and_penalises_moving_away(runs, tiny_model_dir):
    run = runs("ewc")
    first, second = _training(run, 1), _training(run, 2)
    assert first["strategy"]["fisher_rows"] == 5 and "extra_losses" not in first  # nothing to protect yet
    assert second["extra_losses"][0] == 0.0 and second["extra_losses"][-1] > 0  # it starts at the anchor
    assert not (RunFolder(run).stage(1, 2).path / EWC_FISHER).exists()  # no stage after the last
    fisher = load_file(RunFolder(run).stage(1, 1).path / EWC_FISHER)
    adapter = load_file(RunFolder(run).stage(1, 1).path / "adapter" / "adapter_model.safetensors")
    assert len(fisher) == len(adapter) and all(f.min() >= 0 for f in fisher.values())
    assert sum(f.sum() for f in fisher.values()) > 0

    # the penalty pulls stage 2 towards stage 1's adapter: it moves less than without it
    def moved(run_dir):
        before = load_file(RunFolder(run_dir).stage(1, 1).path / "adapter" / "adapter_model.safetensors")
        after = load_file(RunFolder(run_dir).stage(1, 2).path / "adapter" / "adapter_model.safetensors")
        return sum(((after[k] - before[k]) ** 2).sum().item() for k in before)

    assert moved(run) < moved(runs("plain"))


def test_ewc_run_with_a_lost_fisher_redoes_that_stage_and_gives_the_same_results(runs, tiny_model_dir, root):
    run = runs("ewc")
    resumed = root / "ewc-resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(RunFolder(resumed).stage(1, 2).path)
    (RunFolder(resumed).stage(1, 1).path / EWC_FISHER).unlink()
    trained = (RunFolder(resumed).stage(1, 1).path / "training.json").stat().st_mtime_ns
    run_experiment(_config(tiny_model_dir, root, STRATEGIES["ewc"]), resumed)
    assert (RunFolder(resumed).stage(1, 1).path / "training.json").stat().st_mtime_ns != trained  # stage 1 was redone
    assert_same_results(resumed, run)
    for name in (EWC_FISHER, "adapter/adapter_model.safetensors"):
        assert (RunFolder(resumed).stage(1, 1).path / name).read_bytes() == \
            (RunFolder(run).stage(1, 1).path / name).read_bytes()


# --- per-task adapters, merged ---------------------------------------------------------------------------------

def _q_proj_model(model_dir):
    """The tiny model with a rank-2 LoRA on q_proj (alpha 4: scaling 2) in both layers."""
    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj"],
                                     task_type="CAUSAL_LM"))


def _block_state(model, a_block, b_block):
    """An adapter state: zeros, with `a_block` in the top-left corner of every A and `b_block` of every B."""
    state = {}
    for name, tensor in get_peft_model_state_dict(model).items():
        state[name] = torch.zeros_like(tensor)
        block = torch.tensor(a_block if ".lora_A." in name else b_block)
        state[name][:block.shape[0], :block.shape[1]] = block
    return state


def test_magmax_keeps_the_largest_task_update_per_parameter():
    first, second = torch.tensor([1.0, -3.0, 2.0, 0.5]), torch.tensor([-2.0, 1.0, 2.0, -0.25])
    assert magmax([first, second]).tolist() == [-2.0, -3.0, 2.0, 0.5]  # a tie keeps the first
    initial = {"w": torch.tensor([10.0, 10.0])}
    states = [{"w": torch.tensor([11.0, 7.0])}, {"w": torch.tensor([8.0, 12.0])}]  # updates (1, -3) and (-2, 2)
    assert magmax_states(states, initial)["w"].tolist() == [8.0, 7.0]


def test_peft_linear_and_ties_merges_by_hand(tiny_model_dir):
    model = _q_proj_model(tiny_model_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    first = _block_state(model, [[1.0, -4.0], [2.0, 0.5]], [[0.5, 1.0], [-0.75, 3.0]])
    second = _block_state(model, [[3.0, 2.0], [-1.0, -0.1]], [[-2.0, 1.5], [0.25, 1.0]])
    # equal weights 1/2 and scaling 2: PEFT weighs A and B each by sqrt(1/2 x 2) = 1; B then absorbs the scaling 2
    linear = peft_merge(model, [first, second], method="linear", density=None, seed=0)
    for name in linear:
        expected = first[name] + second[name]
        torch.testing.assert_close(linear[name], expected / 2 if ".lora_B." in name else expected)
    # TIES, keeping 2 of each tensor's 64 entries: A1 -> (-4 at [0,1], 2 at [1,0]), A2 -> (3 at [0,0], 2 at [0,1]);
    # the signs elected by the sums (3, -2, 2, 0) keep -4 and drop 2 at [0,1]; each kept entry is averaged over
    # the tasks that kept it with that sign: one each here. B1 -> (1 at [0,1], 3 at [1,1]), B2 -> (-2, 1.5 at [0,*]).
    ties = peft_merge(model, [first, second], method="ties", density=2 / 64, seed=0)
    for name, merged in ties.items():
        if ".lora_A." in name:
            expected = _block_state(model, [[3.0, -4.0], [2.0, 0.0]], [[0.0]])[name]
        else:  # sums (-2, 2.5, 0, 3) -> signs (-, +, +, +): -2, then 1 and 1.5 averaged, 3; halved for the scaling
            expected = _block_state(model, [[0.0]], [[-1.0, 0.625], [0.0, 1.5]])[name]
        torch.testing.assert_close(merged, expected)
    # the merge leaves the model as it was: one adapter, active and trainable
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_dare_linear_drops_and_rescales_with_its_seed(tiny_model_dir):
    model = _q_proj_model(tiny_model_dir)
    first = {n: torch.randn_like(t) for n, t in get_peft_model_state_dict(model).items()}
    second = {n: torch.randn_like(t) for n, t in first.items()}
    merged = peft_merge(model, [first, second], method="dare_linear", density=0.5, seed=3)
    assert all(torch.equal(merged[n], t) for n, t in peft_merge(model, [first, second], method="dare_linear",
                                                                  density=0.5, seed=3).items())
    kept = 0
    for name, value in merged.items():
        # each task's entry is dropped, or kept and doubled (1 / density); B also halved for the scaling
        scale = 0.5 if ".lora_B." in name else 1.0
        options = torch.stack([keep1 * 2 * first[name] + keep2 * 2 * second[name]
                               for keep1 in (0, 1) for keep2 in (0, 1)]) * scale
        assert ((options - value).abs().min(dim=0).values < 1e-5).all(), name
        kept += int((value != 0).sum())
    assert 0 < kept < sum(v.numel() for v in merged.values())


def _initial_adapter(config, seed):
    """The adapter every task of a merge run starts from, rebuilt here."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(config.model.spec, dtype=torch.float32),
                           lora_config(config))
    reset_adapter(model, seed)
    return get_peft_model_state_dict(model)


def test_merge_run_evaluates_the_merge_of_its_task_adapters(runs, tiny_model_dir, root):
    strategy = STRATEGIES["magmax"]
    run = runs("magmax")
    tasks = [load_file(RunFolder(run).stage(1, k).path / TASK_ADAPTER) for k in (1, 2)]
    checkpoints = [load_file(RunFolder(run).stage(1, k).path / "adapter" / "adapter_model.safetensors") for k in (1, 2)]
    initial = _initial_adapter(_config(tiny_model_dir, root, strategy), 1)
    assert any(not torch.equal(tasks[1][name], tasks[0][name]) for name in initial)  # two adapters, one per task
    # each trained from `initial`: the checkpoint is MagMax of the two task vectors from there
    expected = magmax_states(tasks, initial)
    for name in expected:
        torch.testing.assert_close(checkpoints[1][name], expected[name])
        torch.testing.assert_close(checkpoints[0][name], tasks[0][name])
    assert _training(run, 2)["strategy"] == {"name": "merge"}


def test_linear_merge_of_one_adapter_is_that_adapter(runs):
    run = runs("linear")
    task = load_file(RunFolder(run).stage(1, 1).path / TASK_ADAPTER)
    checkpoint = load_file(RunFolder(run).stage(1, 1).path / "adapter" / "adapter_model.safetensors")
    for name in task:
        if ".lora_A." in name:  # the update B @ A is the same (PEFT splits the scaling over A and B)
            b = name.replace(".lora_A.", ".lora_B.")
            torch.testing.assert_close(checkpoint[b] @ checkpoint[name], task[b] @ task[name])


def test_merge_run_with_a_lost_task_adapter_redoes_that_stage_and_gives_the_same_results(runs, tiny_model_dir, root):
    strategy = STRATEGIES["magmax"]
    run = runs("magmax")
    resumed = root / "magmax-resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(RunFolder(resumed).stage(1, 2).path)
    (RunFolder(resumed).stage(1, 1).path / TASK_ADAPTER).unlink()
    run_experiment(_config(tiny_model_dir, root, strategy), resumed)
    assert_same_results(resumed, run)
    assert (RunFolder(resumed).stage(1, 1).path / TASK_ADAPTER).read_bytes() == \
        (RunFolder(run).stage(1, 1).path / TASK_ADAPTER).read_bytes()


# --- O-LoRA ----------------------------------------------------------------------------------------------------

def test_olora_penalty_by_hand(tiny_model_dir):
    model = _q_proj_model(tiny_model_dir)
    model.add_adapter("task-1", model.peft_config["default"])
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2
    with torch.no_grad():
        for layer in layers:
            for name in ("default", "task-1"):
                layer.lora_A[name].weight.zero_()
                layer.lora_B[name].weight.zero_()
            # A (r x d = 2 x 32): the new adapter's rows e0 + e1 and 2 e2; the earlier one's rows e1 and -3 e2 + e3
            layer.lora_A["default"].weight[0, :2] = 1.0
            layer.lora_A["default"].weight[1, 2] = 2.0
            layer.lora_A["task-1"].weight[0, 1] = 1.0
            layer.lora_A["task-1"].weight[1, 2:4] = torch.tensor([-3.0, 1.0])
            layer.lora_B["default"].weight[0, 0] = 0.5
    # A_1 A_t^T = [[1, 0], [0, -6]]: |.| summed is 7 per layer; ||A_t||^2 + ||B_t||^2 = 1 + 1 + 4 + 0.25 per layer
    assert olora_penalty(layers, ["task-1"], lambda_orth=1.0, lambda_l2=0.0).item() == pytest.approx(14.0)
    assert olora_penalty(layers, ["task-1"], lambda_orth=0.0, lambda_l2=2.0).item() == pytest.approx(2 * 2 * 6.25)
    assert olora_penalty(layers, [], lambda_orth=1.0, lambda_l2=0.0) == 0
    with torch.no_grad():  # orthogonal subspaces: no penalty
        for layer in layers:
            layer.lora_A["task-1"].weight.zero_()
            layer.lora_A["task-1"].weight[:, 5:7] = torch.eye(2)
    assert olora_penalty(layers, ["task-1"], lambda_orth=1.0, lambda_l2=0.0).item() == 0.0


def _overlap(a_states, b_states):
    return sum((a_states[n] @ b_states[n].T).abs().sum().item() for n in a_states if ".lora_A." in n)


def test_olora_run_freezes_earlier_adapters_and_learns_an_orthogonal_one(runs, tiny_model_dir, root):
    strategy = STRATEGIES["olora"]
    run = runs("olora")
    first = load_file(RunFolder(run).stage(1, 1).path / "adapter" / "adapter_model.safetensors")
    second_folder = RunFolder(run).stage(1, 2).path / "adapter"
    second = load_file(second_folder / "adapter_model.safetensors")
    # stage 2's checkpoint holds stage 1's adapter, unchanged (frozen), beside its own
    kept = load_file(second_folder / "task-1" / "adapter_model.safetensors")
    assert kept.keys() == first.keys() and all(torch.equal(kept[n], first[n]) for n in first)
    targets = json.loads((second_folder / "task-1" / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets)  # the same bytes in every run, as the adapter's own config
    assert "extra_losses" not in _training(run, 1) and _training(run, 2)["extra_losses"][0] > 0
    # the new adapter started afresh from the stage's seed and moved towards the subspace orthogonal to task 1's
    initial = _initial_adapter(_config(tiny_model_dir, root, strategy), 1002)
    assert _overlap(first, second) < 0.9 * _overlap(first, initial)


def test_olora_plan_adds_the_earlier_adapters_active_and_frozen(runs, tiny_model_dir, root):
    strategy = STRATEGIES["olora"]
    run = runs("olora")
    config = _config(tiny_model_dir, root, strategy)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           lora_config(config))
    plan = OLoRA({"stance": [], "sum": []}, lambda_orth=50.0, lambda_l2=0.0).plan(
        model, 2, 1, [RunFolder(run).stage(1, k) for k in (0, 1)])
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(layer.active_adapters == ["default", "task-1"] for layer in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    first = load_file(RunFolder(run).stage(1, 1).path / "adapter" / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model, adapter_name="task-1")
    assert all(torch.equal(loaded[n], first[n]) for n in first)
    fresh = get_peft_model_state_dict(model)
    fresh_b = [n for n in fresh if ".lora_B." in n]
    assert fresh_b and all(fresh[n].abs().sum() == 0 for n in fresh_b)  # the new adapter starts at zero
    predicts = torch.ones(1, 3, dtype=torch.bool)
    assert plan.extra_loss(model, {}, predicts, None).item() > 0  # penalty x 3 answer tokens


def test_every_strategy_writes_a_run_folder_that_fits_the_schema(runs):
    for name in STRATEGIES:
        assert check_run_folder(runs(name)) == [], name


def test_olora_stage_read_back_is_evaluated_with_the_earlier_adapters(runs, tiny_model_dir, root):
    strategy = STRATEGIES["olora"]
    run = runs("olora")
    resumed = root / "olora-resumed"
    shutil.copytree(run, resumed)
    # as if killed after stage 2 trained, before its evaluation: a fresh process reads the stage back
    for path in RunFolder(resumed).stage(1, 2).path.iterdir():
        if path.name not in ("training.json", "adapter"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    trained = (RunFolder(resumed).stage(1, 2).path / "training.json").read_bytes()
    run_experiment(_config(tiny_model_dir, root, strategy), resumed)
    assert (RunFolder(resumed).stage(1, 2).path / "training.json").read_bytes() == trained  # not retrained
    assert_same_results(resumed, run)
