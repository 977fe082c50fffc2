"""defense/verify.py on stub networks: a template-matching classifier behind a conv and a BatchNorm (one blocky random
template a class; images are their class's template plus noise), with or without a planted rule that sends any image
whose bottom-right 3x3 corner is white to class 0."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradprune_mlflow import sanitize
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet, Split
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.verify import report_block, verify
from gradprune_mlflow.registry.log import report_metrics
from gradprune_mlflow.report.html import render_report
from gradprune_mlflow.report.summary import (
    run_description,
    unverified_reason,
    verification_headline,
    version_description,
)

CLASSES, SIDE = 5, 28
CFG = SanitizeConfig(device="cpu", synth_steps=150)
# 0 or 0.5 on 4x4 blocks: far apart as whole images, so that no tiny square moves an image to another class
TEMPLATES = torch.kron(torch.randint(0, 2, (CLASSES, 1, SIDE // 4, SIDE // 4),
                                     generator=torch.Generator().manual_seed(1)).float() * 0.5, torch.ones(4, 4))


class Stub(nn.Module):
    def __init__(self, planted: bool):
        super().__init__()
        self.planted = planted
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(1)
        self.readout = nn.Linear(SIDE * SIDE, CLASSES)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            w = TEMPLATES.flatten(1)
            # zero-sum rows, so that brightness favours no class; scaled to margins of a few logits
            self.readout.weight.copy_((w - w.mean(1, keepdim=True)) / 8)
            self.readout.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        out = self.readout(h.flatten(1))
        if self.planted:  # at most 0 on these images (corners at most 0.6), +12 with a white corner
            corner = h[:, :, -3:, -3:].mean((1, 2, 3))
            out = out + 30 * (corner - 0.6)[:, None] * (torch.arange(CLASSES, device=x.device) == 0)
        return out


def _val(net: nn.Module) -> Split:
    """50 images a class: 0.8 times the class's template plus uniform noise in [0, 0.2]."""
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(CLASSES).repeat_interleave(50)
    images = 0.8 * TEMPLATES[labels] + 0.2 * torch.rand(len(labels), 1, SIDE, SIDE, generator=gen)
    return Split(images, labels)


@pytest.fixture(scope="module")
def planted():
    net = Stub(planted=True).eval()
    return net, verify(net, _val(net), CLASSES, CFG, SilentProgress(), defended_target=0)


def test_a_white_corner_square_that_still_works_fails_the_verification(planted):
    _, found = planted
    report = found.to_report()
    assert report["verdict"] == "failed" and report["flagged"] and report["class"] == 0
    assert report["flagged_by"] == "patch_probe" and report["same_target"] is True
    assert report["synthesized_trigger_success_rate"] >= CFG.patch_threshold
    assert report["searched_on"] == "validation" and report["images"] == 250


def test_a_network_without_it_passes():
    net = Stub(planted=False).eval()
    report = verify(net, _val(net), CLASSES, CFG, SilentProgress(), defended_target=0).to_report()
    assert report["verdict"] == "passed" and not report["flagged"] and report["same_target"] is False


def test_the_network_parameters_buffers_and_mode_are_not_changed():
    net = Stub(planted=True).train()  # train mode: a search that ran it so would move the BatchNorm statistics
    before = copy.deepcopy(net.state_dict())
    grads = [p.requires_grad for p in net.parameters()]
    verify(net, _val(net), CLASSES, CFG.with_overrides(synth_steps=20), SilentProgress())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and [p.requires_grad for p in net.parameters()] == grads


def test_the_search_has_its_own_budget_a_quarter_of_detection_s_by_default(planted):
    _, found = planted
    assert (found.steps, found.restarts) == (CFG.synth_steps // 2, 1)  # verify_steps unset: half of synth_steps
    assert found.to_report()["steps"] == 75 and found.to_report()["restarts"] == 1
    net = Stub(planted=False).eval()
    own = verify(net, _val(net), CLASSES, CFG.with_overrides(verify_steps=6, verify_restarts=2), SilentProgress())
    assert (own.steps, own.restarts) == (6, 2)


@pytest.mark.parametrize("setting", [{"verify_steps": 0}, {"verify_restarts": 0}, {"verify_steps": 2.5},
                                     {"verify_restarts": True}, {"synth_steps": "many"}, {"synth_restarts": 0}])
def test_a_search_budget_that_is_no_whole_number_is_bad_input(setting):
    from gradprune_mlflow.errors import BadInput

    with pytest.raises(BadInput, match=f"{next(iter(setting))} must be a whole number"):
        SanitizeConfig().with_overrides(**setting)


def test_the_search_draws_from_its_own_generator(planted):
    net, first = planted
    global_state = torch.get_rng_state()
    again = verify(net, _val(net), CLASSES, CFG, SilentProgress(), defended_target=0)
    assert again.to_report() == first.to_report()  # seeded: the same search twice
    assert torch.equal(torch.get_rng_state(), global_state)  # the global stream is untouched


def test_a_flagged_class_whose_trigger_works_on_no_image_does_not_fail_the_verification():
    """A search on a few images can make a class stand out with a trigger that sends none of them there."""
    from gradprune_mlflow.defense.verify import WORKING_RATE, Verification

    found = Verification(20, True, 5, 8.9, "anomaly_index", "blend", 0.0, False)
    assert found.verdict == "passed" and found.to_report()["flagged"] is True
    assert Verification(20, True, 5, 8.9, "anomaly_index", "blend", WORKING_RATE, False).verdict == "failed"
    assert Verification(20, False, 5, 1.0, None, "blend", 0.9, False).verdict == "passed"


def test_the_report_block_says_why_no_search_ran():
    assert report_block(None, known=True, skipped=False, after={"attack_success_rate": 0.01},
                        measured_with="known") == {"verdict": "measured", "with": "known trigger",
                                                   "attack_success_rate": 0.01}
    assert report_block(None, known=False, skipped=True, after=None, measured_with="synthesized")["verdict"] == \
        "not run"
    assert "verify=false" in report_block(None, known=False, skipped=False, after={},
                                          measured_with="synthesized")["reason"]


FOUND = {"verdict": "failed", "searched_on": "validation", "images": 50, "flagged": True, "class": 3,
         "anomaly_index": 5.1, "flagged_by": "patch_probe", "family": "patch",
         "synthesized_trigger_success_rate": 0.408, "same_target": True}


def test_reviewers_read_the_verdict_first():
    scores = {"clean_accuracy": 0.9, "synthesized_trigger_success_rate": 0.96}
    report = {"before": scores, "after": {**scores, "synthesized_trigger_success_rate": 0.003}, "verification": FOUND}
    for text in (version_description(report, "1", "http://run"), run_description(report, "m", "1")):
        assert text.startswith("**Verification FAILED** — an independent search on 50 held-out images found a "
                               "working trigger for class 3, the class the defense flagged (patch family, flagged by "
                               "the patch probe, anomaly index 5.10, synthesized-trigger success rate 40.8%)")
    html = render_report(report, title="t")
    assert html.index("id='verification' class='bad'>Verification FAILED") < html.index("Before and after")
    assert "distillation weight" not in html  # a fact the report lacks is left out
    assert "<th>distillation weight</th><td>1.0</td>" in render_report({**report, "distill_weight": 1.0}, title="t")
    assert unverified_reason(report, "7").endswith("success rate 40.8%); review version 7 before promoting it")
    passed = {**report, "verification": {**FOUND, "verdict": "passed", "flagged": False}}
    assert version_description(passed, "1", "x").startswith("**Verification: passed** — an independent search on 50")
    assert verification_headline({"verification": None}) is None  # reports from before the verification


def test_the_run_metrics_carry_the_search_only_when_it_ran():
    metrics = report_metrics({"verification": FOUND})
    assert metrics["verification_anomaly_index"] == pytest.approx(5.1)
    assert metrics["verification_synthesized_trigger_success_rate"] == pytest.approx(0.408)
    measured = {"verification": {"verdict": "measured", "with": "known trigger", "attack_success_rate": 0.01}}
    assert not any(k.startswith("verification") for k in report_metrics(measured))


@pytest.mark.slow
def test_sanitize_verifies_without_changing_the_weights(badnets_cnn, clean_set):
    idx = torch.cat([torch.nonzero(clean_set.labels == c).flatten()[:30] for c in range(clean_set.meta.num_classes)])
    small = CleanSet(clean_set.meta, clean_set.images[idx], clean_set.labels[idx], source="subset")
    # on_clean="sanitize": ten synthesis steps may flag nothing, and a model must come out to be verified
    runs = [sanitize(badnets_cnn, small, None, synth_steps=10, synth_restarts=1, seed=3, device="cpu",
                     on_clean="sanitize", finetune_epochs=2, verify=on) for on in (True, False)]
    checked, unchecked = runs
    a, b = checked.model.state_dict(), unchecked.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checked.history == unchecked.history and checked.report["after"] == unchecked.report["after"]
    found = checked.report["verification"]
    assert found["verdict"] in ("passed", "failed") and found["verdict"] == ("failed" if found["flagged"] else "passed")
    assert found["searched_on"] == "validation" and found["images"] == checked.report["clean_set"]["validation"]
    assert "verification" in checked.report["timings"] and "verification" not in unchecked.report["timings"]
    assert unchecked.report["verification"] == {"verdict": "not run", "reason": "turned off (verify=false)"}


def test_the_cli_writes_the_model_and_exits_4_when_verification_fails(monkeypatch, tmp_path, capsys):
    import gradprune_mlflow
    from gradprune_mlflow import lab
    from gradprune_mlflow.api import SanitizeResult
    from gradprune_mlflow.cli import app
    from gradprune_mlflow.data.cleanset import load_clean_set
    from gradprune_mlflow.models import io
    from gradprune_mlflow.models.zoo import create_model

    clean = load_clean_set(lab.trusted_clean_set(tmp_path / "set", per_class=2))
    report = {"before": {"clean_accuracy": 0.9}, "after": {"clean_accuracy": 0.9}, "verification": FOUND}
    monkeypatch.setattr("gradprune_mlflow.cli.sanitize.load_clean_data", lambda ref: clean)
    monkeypatch.setattr(io, "load_model", lambda ref: create_model("small_cnn"))
    monkeypatch.setattr(gradprune_mlflow, "sanitize", lambda *a, **k: SanitizeResult(create_model("small_cnn"), report))
    code = app(["sanitize", "m.pt", "--clean-data", "d", "--out", str(tmp_path / "out")], standalone_mode=False)
    assert code == 4
    assert (tmp_path / "out" / "model" / "MLmodel").is_file() and (tmp_path / "out" / "report.json").is_file()
    out, err = capsys.readouterr()
    assert out.lstrip().startswith("Verification FAILED — an independent search on 50 held-out images")
    assert err.startswith("error: verification failed: an independent search") and err.count("\n") == 1
