"""The front door end to end: sanitize() on real backdoored models and Fashion-MNIST, the report, and bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gradprune_mlflow import sanitize
from gradprune_mlflow.data.cleanset import CleanSet, Split
from gradprune_mlflow.defense.metrics import evaluate
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.probes import noise_responses
from gradprune_mlflow.defense.triggers import BlendTrigger, PatchTrigger
from gradprune_mlflow.errors import BadInput, TriggerError, UnsupportedModel
from gradprune_mlflow.models.zoo import SmallCNN

TRIGGER = PatchTrigger(0, size=3, location="bottom-right")  # the trigger badnets_cnn was poisoned with
REPORT_KEYS = {"schema", "mode", "device", "seconds", "trigger_source", "asr_measured_with", "detection", "before",
               "after", "pruned_filters", "total_filters", "gradient_passes", "evaluated_on"}
METRICS = ("clean_accuracy", "attack_success_rate", "robust_accuracy", "clean_target_rate")
SMALL = {"device": "cpu", "finetune_epochs": 2}  # for runs whose outcome is compared, not judged


def subset(clean_set: CleanSet, per_class: int) -> CleanSet:
    """The first `per_class` images of every class of the trusted set (runs that compare weights need no more)."""
    idx = torch.cat([torch.nonzero(clean_set.labels == c).flatten()[:per_class]
                     for c in range(clean_set.meta.num_classes)])
    return CleanSet(clean_set.meta, clean_set.images[idx], clean_set.labels[idx], source="subset")


def measure(model: nn.Module, data, trigger, meta) -> dict:
    """The report's metric block for `model`, measured on a copy (evaluating through a fresh wrapper must not
    change the mode of a fixture's model)."""
    return evaluate(Normalized(copy.deepcopy(model), meta.mean, meta.std).eval(), data, trigger)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ in {different}"


def assert_changed(model: nn.Module, original: nn.Module) -> None:
    """The defense did something, so that an equality of two sanitized models is not the trivial one."""
    so = original.state_dict()
    assert any(not torch.equal(v, so[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def known(badnets_cnn, clean_set, fashion_test):
    """Known-trigger fast mode on the BadNets model, measured on 2,000 test images; the input model's weights too."""
    snapshot = copy.deepcopy(badnets_cnn.state_dict()), badnets_cnn.training
    result = sanitize(badnets_cnn, clean_set, TRIGGER, device="cpu", finetune_epochs=5, test_set=fashion_test)
    result.returned_in_training_mode = result.model.training  # read before any test touches the model
    return result, snapshot


@pytest.mark.slow
def test_known_trigger_removes_the_backdoor_and_keeps_clean_accuracy(known):
    result, _ = known
    before, after = result.report["before"], result.report["after"]
    assert before["attack_success_rate"] > 0.9, "the fixture model should carry the backdoor"
    assert after["attack_success_rate"] < 0.2
    assert before["clean_accuracy"] - after["clean_accuracy"] < 0.08
    assert after["robust_accuracy"] > before["robust_accuracy"] + 0.5


@pytest.mark.slow
def test_the_callers_model_is_not_changed(known, badnets_cnn):
    result, (weights, training) = known
    assert result.model is not badnets_cnn
    assert all(torch.equal(v, weights[k]) for k, v in badnets_cnn.state_dict().items())
    assert badnets_cnn.training is training


# Regression (was a library bug, fixed): the sanitized model comes back in TRAINING mode.
# gradprune_mlflow/defense/pipeline.py line 151 sets
# `sanitized = work.cpu().eval()`, but line 155 then measures it through a fresh `Normalized(sanitized, ...)` wrapper,
# which is in training mode, and gradprune_mlflow/defense/metrics.py `logits()` (lines 31-37) ends with
# `net.train(was_training)` on that wrapper: `train(True)` recurses into the sanitized model. A Python caller of
# sanitize() then runs BatchNorm on batch statistics and updates its running statistics on every forward (the MLflow
# folder is spared only because models/io.save_model calls .eval() before saving). The same
# restore-by-flag pattern is in unlearning.unlearning_gradients (line 32). Fix: restore each module's own mode in
# logits() (e.g. remember {m: m.training for m in net.modules()}), or build the wrappers with `.eval()` and return
# `sanitized.eval()` after measuring.
@pytest.mark.slow
def test_the_sanitized_model_is_returned_in_eval_mode(known):
    result, _ = known
    assert result.returned_in_training_mode is False
    assert not any(m.training for m in result.model.modules())


@pytest.mark.slow
def test_report_follows_schema_1(known):
    result, _ = known
    report = result.report
    assert REPORT_KEYS <= set(report)
    assert report["schema"] == 1 and report["mode"] == "fast" and report["device"] == "cpu"
    assert isinstance(report["seconds"], float) and report["seconds"] > 0
    assert report["trigger_source"] == "known" and report["asr_measured_with"] == "known"
    assert report["detection"] is None, "known-trigger mode detects nothing"
    assert report["search_precision"] is None, "nor searches"
    assert report["train_precision"] in ("fp32", "bf16"), "fine-tuning says what it computed in"
    assert report["unlearning_plan"] == [{"trigger": "patch", "share": 1.0}]
    assert report["evaluated_on"] == "test" and report["evaluated_images"] == 2000
    timings = report["timings"]
    assert set(timings) == {"pruning", "fine_tuning", "measuring"}, "no synthesis or recheck with a known trigger"
    assert all(t > 0 for t in timings.values()) and sum(timings.values()) <= report["seconds"]
    for block in ("before", "after"):
        assert set(report[block]) == set(METRICS)
        assert all(0.0 <= report[block][m] <= 1.0 for m in METRICS), report[block]
    assert report["total_filters"] == 32 + 64
    assert 0 <= report["pruned_filters"] == len(result.history) <= report["total_filters"]
    assert report["sanitized"] is True
    assert isinstance(report["gradient_passes"], int) and report["gradient_passes"] >= 1
    assert sum(report["pruned_by_layer"].values()) == report["pruned_filters"]
    assert json.loads(json.dumps(report)) == report, "the report must be plain JSON"


class _CornersVoteZero(nn.Module):
    """Class 0 when the top-left pixel is bright, or the bottom-right one (a stand-in backdoor), else
    class 1."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # metrics.logits reads the device off a parameter

    def forward(self, x):
        zero = ((x[:, 0, 0, 0] > 0.5) | (x[:, 0, -1, -1] > 0.5)).float()
        return torch.stack([zero, 1 - zero], 1)


def test_clean_target_rate_counts_untriggered_images_the_model_already_puts_in_the_target():
    images = torch.zeros(10, 1, 4, 4)
    images[:3, 0, 0, 0] = 1.0  # three of the eight non-target images already look like class 0
    labels = torch.tensor([1] * 8 + [0] * 2)
    corner = PatchTrigger(target=0, size=1)
    block = evaluate(_CornersVoteZero(), Split(images, labels), corner)
    assert block["attack_success_rate"] == 1.0 and block["robust_accuracy"] == 0.0
    assert block["clean_target_rate"] == pytest.approx(3 / 8)
    assert evaluate(_CornersVoteZero(), Split(images, labels), None)["clean_target_rate"] is None


@pytest.mark.slow
def test_reported_after_metrics_equal_a_reevaluation_of_the_model(known, clean_set, fashion_test, badnets_cnn,
                                                                   tmp_path):
    result, _ = known
    meta = clean_set.meta
    assert measure(result.model, fashion_test, TRIGGER, meta) == result.report["after"]
    assert measure(badnets_cnn, fashion_test, TRIGGER, meta) == result.report["before"]
    torch.save(result.model, tmp_path / "sanitized.pt")
    reloaded = torch.load(tmp_path / "sanitized.pt", weights_only=False)
    assert measure(reloaded, fashion_test, TRIGGER, meta) == result.report["after"]


@pytest.mark.slow
def test_saved_model_is_plain_with_the_pruned_zeros_folded_in(badnets_cnn, clean_set, tmp_path):
    # A loose accuracy budget keeps the first pruning step whatever the freshly trained model's filters are like:
    # this test is about how pruned filters end up in the saved model, not about when to stop pruning.
    result = sanitize(badnets_cnn, clean_set, TRIGGER, device="cpu", finetune_epochs=2, acc_drop_budget=0.9)
    assert result.history, "the known-trigger run should have pruned at least one filter"
    torch.save(result.model, tmp_path / "sanitized.pt")
    for model in (result.model, torch.load(tmp_path / "sanitized.pt", weights_only=False)):
        assert type(model) is type(badnets_cnn)
        assert list(model.state_dict()) == list(badnets_cnn.state_dict()), "state_dict keys must be unchanged"
        for name, m in model.named_modules():
            assert not parametrize.is_parametrized(m), name
            assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), f"hooks left on {name!r}"
        modules = dict(model.named_modules())
        bn_of = {"features.0": "features.1", "features.4": "features.5"}
        for entry in result.history:
            f = entry["filter"]
            assert torch.count_nonzero(modules[entry["layer"]].weight[f]) == 0
            bn = modules[bn_of[entry["layer"]]]
            assert bn.weight[f] == 0 and bn.bias[f] == 0


# --- the evaluation trigger and the seed ---


@pytest.fixture(scope="module")
def small_set(clean_set):
    return subset(clean_set, per_class=30)


@pytest.fixture(scope="module")
def known_pair(badnets_cnn, small_set, fashion_test):
    """Two known-trigger runs that differ only in the evaluation trigger (the real patch vs a blend)."""
    return [sanitize(badnets_cnn, small_set, TRIGGER, eval_trigger=ev, test_set=fashion_test, seed=3, **SMALL)
            for ev in (PatchTrigger(0, location="bottom-right"), BlendTrigger(0, alpha=0.2))]


@pytest.mark.slow
def test_eval_trigger_never_reaches_the_defense_known_mode(known_pair, badnets_cnn):
    with_patch, with_blend = known_pair
    assert_changed(with_patch.model, badnets_cnn)
    assert_same_weights(with_patch.model, with_blend.model)
    assert with_patch.history == with_blend.history and with_patch.curve == with_blend.curve
    for result in known_pair:
        assert result.report["asr_measured_with"] == "eval" and result.report["trigger_source"] == "known"
    # The eval trigger was really used for measuring: the same model scores differently under the two triggers.
    assert with_patch.report["before"]["attack_success_rate"] != with_blend.report["before"]["attack_success_rate"]


@pytest.mark.slow
def test_same_seed_twice_gives_bit_identical_weights_on_cpu(known_pair, badnets_cnn, small_set, fashion_test):
    again = sanitize(badnets_cnn, small_set, TRIGGER, eval_trigger=PatchTrigger(0), test_set=fashion_test, seed=3,
                     **SMALL)
    first = known_pair[0]
    assert again.report["device"] == "cpu"
    assert_same_weights(first.model, again.model)
    assert again.report["after"] == first.report["after"]
    assert again.report["gradient_passes"] == first.report["gradient_passes"]


@pytest.mark.slow
def test_accuracies_are_measured_on_validation_without_test_data(known_pair, badnets_cnn, small_set):
    """Without test_set the report says 'validation'; the test data never changed the defense either."""
    result = sanitize(badnets_cnn, small_set, TRIGGER, seed=3, **SMALL)
    assert result.report["evaluated_on"] == "validation"
    assert result.report["evaluated_images"] == result.report["clean_set"]["validation"] == 30
    assert result.report["asr_measured_with"] == "known"
    assert all(0.0 <= result.report["after"][m] <= 1.0 for m in METRICS)
    assert_same_weights(result.model, known_pair[0].model)


@pytest.mark.slow
def test_eval_trigger_never_reaches_the_defense_trigger_free_mode(badnets_cnn, small_set):
    # on_clean is left at "skip". Ten synthesis steps rarely put a mask on the real patch, so patch_threshold=0 makes
    # the patch probe flag its best class whatever it reached: that runs the probe's unlearning path every time.
    # (test_synthesis checks the probe at the default threshold, after 200 steps.)
    runs = [sanitize(badnets_cnn, small_set, None, eval_trigger=ev, synth_steps=10, synth_restarts=1, seed=3,
                     patch_threshold=0.0, **SMALL)
            for ev in (PatchTrigger(0, location="bottom-right"), BlendTrigger(0, alpha=0.2))]
    for result in runs:
        report = result.report
        assert result.model is not None and report["sanitized"] is True
        assert report["trigger_source"] == "synthesized" and report["asr_measured_with"] == "eval"
        assert {"target", "anomaly_index", "flagged", "flagged_by", "probes", "rechecks",
                "noise_response"} <= set(report["detection"])
        # the patch probe flagged; noise alone does not send images to that class (no fresh noise)
        assert report["detection"]["flagged_by"] == "patch_probe" and report["detection"]["flagged"] is True
        assert 0.0 <= report["detection"]["noise_response"] < 0.5
        rechecks = report["detection"]["rechecks"]
        # At least one search of the flagged class after fine-tuning; another only while it is still anomalous.
        assert 1 <= len(rechecks) <= 2 and [r["round"] for r in rechecks] == list(range(1, len(rechecks) + 1))
        assert all(r["repeated"] is (r["anomaly_index"] > 2.0) for r in rechecks)
        assert all(r["repeated"] for r in rechecks[:-1])
        assert all(r["family"] in ("patch", "blend") for r in rechecks)
        # both families over every class first (the BadNets patch is decisive at the first reading: the flagged
        # class alone searches the second half), then both families over the flagged class per recheck, as long
        # as the first reading searched
        assert report["detection"]["search_steps"] == 5
        assert report["synthesis_steps"] == (10 + 5 * len(rechecks)) * 1 * 2
        # auto on a CPU: float32, or where the CPU computes bfloat16 what it timed as faster (test_searchnet.py)
        assert report["config"]["search_precision"] == "auto" and report["search_precision"] in ("fp32", "bf16")
        assert report["config"]["train_precision"] == "auto" and report["train_precision"] in ("fp32", "bf16")
        # the probe's square, then each repeated recheck's triggers, each an equal share of the unlearning images
        plan = {p["trigger"]: p["share"] for p in report["unlearning_plan"]}
        repeats = sum(r["repeated"] for r in rechecks)
        assert sum(plan.values()) == pytest.approx(1.0, abs=1e-3)
        assert plan[result.triggers[0].source] == pytest.approx(1 / (2 + repeats), abs=1e-3)
        assert {"synthesis", "pruning", "fine_tuning", "rechecks", "measuring"} <= set(report["timings"])
        # the flagged class's synthesized triggers of both families are returned, the flagging family's first
        # (after the patch probe's square, which is what flagged the class and what ASR is measured with)
        sources = [t.source for t in result.triggers]
        assert sources.pop(0) == f"probe-{max(report['detection']['probes']['patch'], key=lambda h: h['best'])['fill']}"
        assert sources[0] == f'synthesized-{report["detection"]["family"]}'
        assert set(sources) == {"synthesized-patch", "synthesized-blend"}
    assert_changed(runs[0].model, badnets_cnn)
    assert_same_weights(runs[0].model, runs[1].model)
    assert runs[0].report["detection"] == runs[1].report["detection"]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(runs[0].triggers, runs[1].triggers, strict=True))


@pytest.mark.slow
def test_trigger_free_on_a_blend_model_flags_by_noise_and_unlearns_it(blend_cnn, clean_set, fashion_test):
    """The noise probe's path end to end: a Blend model answers to uniform noise, is flagged by it, and afterwards
    neither noise nor the real blend (given for evaluation only) sends the other classes' images to class 0."""
    # A patch threshold above 1 turns the patch probe off: after ten steps its squares land anywhere, and on this
    # model one can pass 90% by chance. The noise probe needs no synthesis. (30 images a class and 5 epochs left
    # 69% ASR, 20 epochs 11%; 100 a class and 5 epochs 6% on one trained test model and 25% on a fresh clone's:
    # the bound below is loose because these five epochs are short, not because the benchmark's 5% is in doubt;
    # with the fixed-strength blend search one cached test model ended at 3.9%.
    # Fine-tuning on clean images alone leaves a Blend backdoor at 95% or more: benchmarks/RESULTS.md.)
    result = sanitize(blend_cnn, clean_set, None, eval_trigger=BlendTrigger(0, alpha=0.2), test_set=fashion_test,
                      synth_steps=10, synth_restarts=1, patch_threshold=1.01,
                      patch_margin=1.01, seed=3, device="cpu", finetune_epochs=5)
    report, detection = result.report, result.report["detection"]
    print(f"blend model: noise response {detection['noise_response']}, ASR {report['before']['attack_success_rate']}"
          f" -> {report['after']['attack_success_rate']}")
    assert detection["flagged_by"] == "noise_probe" and detection["flagged"] is True
    assert detection["target"] == 0 and detection["family"] == "blend" and detection["noise_response"] > 0.5
    assert result.model is not None and report["asr_measured_with"] == "eval"
    assert report["before"]["attack_success_rate"] > 0.9 and report["after"]["attack_success_rate"] < 0.4
    assert report["before"]["clean_accuracy"] - report["after"]["clean_accuracy"] < 0.05
    after = Normalized(copy.deepcopy(result.model), clean_set.meta.mean, clean_set.meta.std).eval()
    assert noise_responses(after, clean_set.as_split(), 10, seed=0)[0] < 0.5
    # the fixed-strength search ran for the flagged blend class: its pattern is shown first and counted
    fixed = result.triggers[0]
    assert fixed.source == "synthesized-fixed-blend" and torch.allclose(fixed.mask, torch.tensor(0.2))
    # decisive at the first reading (5 of 10 steps), so the rechecks search 5 steps each
    assert detection["search_steps"] == 5
    assert report["synthesis_steps"] == (10 + 5 * len(detection["rechecks"])) * 2 + 300


@pytest.mark.slow
def test_trigger_free_on_a_clean_model_with_skip(clean_cnn, clean_set):
    """Nothing to find: with on_clean='skip' no model is written and the report says so."""
    # (with these settings the top class's anomaly index has come out above 2: the old rule flagged this model)
    result = sanitize(clean_cnn, subset(clean_set, 30), None, device="cpu", on_clean="skip", synth_steps=10,
                      synth_restarts=1, finetune_epochs=2, seed=5)
    report, detection = result.report, result.report["detection"]
    print(f"clean model: detection {detection['family']} class {detection['target']} "
          f"anomaly index {detection['anomaly_index']} flagged {detection['flagged']}")
    assert report["trigger_source"] == "synthesized" and report["asr_measured_with"] == "synthesized"
    # measured with the defense's own trigger: never under the attack's name
    assert "attack_success_rate" not in report["before"] and "robust_accuracy" not in report["before"]
    assert 0.0 <= report["before"]["synthesized_trigger_success_rate"] <= 1.0
    assert {"synthesis", "measuring"} <= set(report["timings"]) and "pruning" not in report["timings"]
    # no probe finds a trigger on a clean model, and an anomaly index alone (its top class can pass 2) flags nothing
    assert detection["flagged"] is False and detection["flagged_by"] is None
    assert max(h["best"] for h in detection["probes"]["patch"]) < 0.9
    assert max(detection["probes"]["noise"]) <= 0.5
    assert result.model is None and report["sanitized"] is False
    assert report["after"] is None and report["pruned_filters"] == 0 and report["gradient_passes"] == 0
    assert 0.0 <= report["before"]["clean_accuracy"] <= 1.0


# --- bad inputs ---


def test_wrong_number_of_outputs_is_bad_input(clean_set):
    with pytest.raises(BadInput, match="5.*10 classes"):
        sanitize(SmallCNN(num_classes=5), clean_set, TRIGGER, device="cpu")


def test_nan_weights_are_unsupported(badnets_cnn, clean_set):
    broken = copy.deepcopy(badnets_cnn)
    with torch.no_grad():
        broken.features[4].weight[3, 0, 1, 1] = float("nan")
    with pytest.raises(UnsupportedModel, match="NaN"):
        sanitize(broken, clean_set, TRIGGER, device="cpu")


@pytest.mark.parametrize("which", ["trigger", "eval_trigger"])
def test_trigger_target_out_of_range_is_a_trigger_error(badnets_cnn, clean_set, which):
    kwargs = {"trigger": TRIGGER, which: PatchTrigger(10)}
    with pytest.raises(TriggerError, match="target 10"):
        sanitize(badnets_cnn, clean_set, device="cpu", **kwargs)


def test_wrong_input_channels_is_bad_input(clean_set):
    with pytest.raises(BadInput, match=r"\[1, 28, 28\]"):
        sanitize(SmallCNN(in_channels=3), clean_set, TRIGGER, device="cpu")


def test_a_model_without_conv2d_is_unsupported(clean_set):
    with pytest.raises(UnsupportedModel, match="Conv2d"):
        sanitize(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), clean_set, TRIGGER, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful where there is no CUDA")
def test_cuda_without_cuda_is_bad_input(badnets_cnn, clean_set):
    with pytest.raises(BadInput, match="CUDA"):
        sanitize(badnets_cnn, clean_set, TRIGGER, device="cuda")


def test_unknown_setting_is_bad_input(badnets_cnn, clean_set):
    with pytest.raises(BadInput, match="finetune_epoch"):
        sanitize(badnets_cnn, clean_set, TRIGGER, finetune_epoch=3)


@pytest.mark.slow
def test_stages_run_one_half_alone_for_the_ablations(badnets_cnn, clean_set):
    small = subset(clean_set, 30)
    tune_only = sanitize(badnets_cnn, small, TRIGGER, stages="finetune", **SMALL).report
    assert tune_only["pruned_filters"] == 0 and tune_only["gradient_passes"] == 0
    assert tune_only["finetune_epochs"] > 0
    prune_only = sanitize(badnets_cnn, small, TRIGGER, stages="prune", acc_drop_budget=0.9, **SMALL).report
    assert prune_only["pruned_filters"] > 0 and prune_only["finetune_epochs"] == 0
    with pytest.raises(BadInput, match="stages must be one of"):
        sanitize(badnets_cnn, small, TRIGGER, stages="neither", **SMALL)
    with pytest.raises(BadInput, match="search_precision must be one of auto, fp32, bf16"):
        sanitize(badnets_cnn, small, TRIGGER, search_precision="half", **SMALL)
    with pytest.raises(BadInput, match="train_precision must be one of auto, fp32, bf16"):
        sanitize(badnets_cnn, small, TRIGGER, train_precision="half", **SMALL)
    with pytest.raises(BadInput, match=r"spread_share must be in \[0, 1\)"):
        sanitize(badnets_cnn, small, TRIGGER, spread_share=1.0, **SMALL)
    with pytest.raises(BadInput, match="on_suspect must be one of report, sanitize"):
        sanitize(badnets_cnn, small, TRIGGER, on_suspect="always", **SMALL)
