"""sanitize() on CUDA: the same defense as on CPU, up to float noise and bf16 autocast. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from gradprune_mlflow import sanitize
from gradprune_mlflow.defense.metrics import evaluate
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.triggers import PatchTrigger

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; none is available here"),
]

TRIGGER = PatchTrigger(0, size=3, location="bottom-right")
SETTINGS = {"finetune_epochs": 5, "seed": 0}


@pytest.fixture(scope="module")
def runs(badnets_cnn, clean_set, fashion_test):
    return {device: sanitize(badnets_cnn, clean_set, TRIGGER, device=device, test_set=fashion_test, **SETTINGS)
            for device in ("cuda", "cpu")}


def test_cuda_run_reports_cuda_and_removes_the_backdoor(runs):
    report = runs["cuda"].report
    assert report["device"] == "cuda"
    assert report["before"]["attack_success_rate"] > 0.9
    assert report["after"]["attack_success_rate"] < 0.2
    assert report["before"]["clean_accuracy"] - report["after"]["clean_accuracy"] < 0.08


def test_cuda_model_comes_back_on_cpu_and_agrees_with_the_cpu_run(runs, clean_set, fashion_test):
    gpu, cpu = runs["cuda"].model, runs["cpu"].model
    assert all(p.device.type == "cpu" for p in gpu.parameters())
    assert runs["cpu"].report["device"] == "cpu"
    meta = clean_set.meta
    on_gpu = evaluate(Normalized(copy.deepcopy(gpu), meta.mean, meta.std).eval(), fashion_test, TRIGGER)
    on_cpu = evaluate(Normalized(copy.deepcopy(cpu), meta.mean, meta.std).eval(), fashion_test, TRIGGER)
    assert abs(on_gpu["clean_accuracy"] - on_cpu["clean_accuracy"]) <= 0.02
    assert on_gpu == runs["cuda"].report["after"]


def test_search_copy_on_cuda_folds_the_batchnorms_and_keeps_the_logits(badnets_cnn, clean_set):
    from gradprune_mlflow.defense.searchnet import search_copy

    net = Normalized(copy.deepcopy(badnets_cnn), clean_set.meta.mean, clean_set.meta.std).cuda().eval()
    fast = search_copy(net, clean_set.images[:8])
    assert next(fast.parameters()).device.type == "cuda"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = clean_set.images[:200].cuda()
    with torch.no_grad():  # TF32 convolutions on both sides: rounding, not a wrong trace
        want = net(x)
        assert (fast(x) - want).abs().max() <= 2e-2 * (want.abs().max() + 1)
        assert (fast(x).argmax(1) == want.argmax(1)).float().mean() > 0.98


def test_auto_precision_searches_a_bfloat16_copy_on_cuda(badnets_cnn, clean_set):
    from gradprune_mlflow.defense.searchnet import search_copy

    net = Normalized(copy.deepcopy(badnets_cnn), clean_set.meta.mean, clean_set.meta.std).cuda().eval()
    low = search_copy(net, clean_set.images[:8], "auto")
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    x = clean_set.images[:200].cuda()
    with torch.no_grad():
        want, got = net(x), low(x)
    assert got.dtype == torch.float32 and (got.argmax(1) == want.argmax(1)).float().mean() > 0.95


def test_trigger_free_run_on_cuda_flags_the_backdoor_with_bfloat16_searches(badnets_cnn, clean_set, fashion_test):
    report = sanitize(badnets_cnn, clean_set, None, device="cuda", eval_trigger=TRIGGER, test_set=fashion_test,
                      **SETTINGS).report
    assert report["config"]["search_precision"] == "auto"
    assert report["train_precision"] == "bf16", "auto fine-tunes under bfloat16 autocast on a GPU that computes it"
    assert report["detection"]["flagged"] and report["detection"]["target"] == 0
    assert report["after"]["attack_success_rate"] < 0.2
