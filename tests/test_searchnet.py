"""The search copy: the same function as the model, rearranged for speed, and the model itself untouched."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torchvision
from test_formats import SHAPE, pt2_folder, script_file, small
from torch import fx, nn

from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.searchnet import search_copy
from gradprune_mlflow.defense.synthesis import synthesize
from gradprune_mlflow.models.io import load_model


def batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_batchnorms_fold_into_the_convs_and_the_logits_stay_the_same(badnets_cnn, clean_set):
    net = Normalized(copy.deepcopy(badnets_cnn), clean_set.meta.mean, clean_set.meta.std).train()
    before = copy.deepcopy(net.state_dict())
    fast = search_copy(net, clean_set.images[:8])
    assert isinstance(fast, fx.GraphModule) and batchnorms(net) == 2 and batchnorms(fast) == 0
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    # the model it came from keeps its mode, its trainable weights and their values
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    x = clean_set.images[:200]
    with torch.no_grad():
        want, got = net.eval()(x), fast(x)
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_a_torchvision_resnet_is_rearranged_with_the_same_logits():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    for m in net.modules():  # running statistics that are not the identity, so that folding them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(4, 3, 32, 32)
    fast = search_copy(net, x)
    assert isinstance(fast, fx.GraphModule) and batchnorms(fast) == 0
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), atol=1e-4)


def test_a_hooked_model_keeps_its_hook_and_folds_inside_it(badnets_cnn, clean_set):
    """The benchmark counts backward passes with a forward hook on the model: the copy must still run it."""
    from gradprune_mlflow.benchmark.counting import BackwardCounter

    model = copy.deepcopy(badnets_cnn).eval()
    with BackwardCounter(model) as counter:
        net = Normalized(model, clean_set.meta.mean, clean_set.meta.std)
        fast = search_copy(net, clean_set.images[:8])
        assert batchnorms(fast) == 0 and fast.model._forward_hooks
        x = clean_set.images[:16].clone().requires_grad_()
        fast(x).sum().backward()
        assert counter.count == 1
        synthesize(fast, clean_set.images[:100], clean_set.labels[:100], 10, "blend", steps=3, restarts=1,
                   generator=torch.Generator().manual_seed(0), progress=SilentProgress())
        assert counter.count == 1 + 3 * 2  # ten rows of 24 images: two passes of five rows a step
        with torch.no_grad():
            assert torch.allclose(fast(clean_set.images[:50]), net(clean_set.images[:50]), atol=1e-4)


class Branchy(nn.Module):
    """Control flow on the data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > 0:
            h = h.relu()
        return self.head(h.mean((2, 3)))


def test_a_model_that_cannot_be_traced_gets_a_plain_frozen_copy():
    net = Branchy().eval()
    x = torch.rand(4, 1, 8, 8)
    fast = search_copy(net, x)
    assert isinstance(fast, Branchy) and fast is not net and batchnorms(fast) == 1
    assert not any(p.requires_grad for p in fast.parameters()) and all(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(fast(x), net(x))


class Wrong(nn.Module):
    """Traces, but its traced form computes something else than it does: a counter shared by every copy is baked
    into the trace as the value it had then."""

    calls = 0

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)

    def forward(self, x):
        Wrong.calls += 1
        return self.conv(x).mean((2, 3)) * Wrong.calls


def test_a_copy_whose_logits_differ_is_not_used():
    net = Wrong().eval()
    fast = search_copy(net, torch.rand(2, 1, 8, 8))
    assert isinstance(fast, Wrong)


def test_synthesis_through_the_copy_finds_the_same_sizes(badnets_cnn, clean_set):
    net = Normalized(copy.deepcopy(badnets_cnn), clean_set.meta.mean, clean_set.meta.std).eval()
    runs = []
    for model in (net, search_copy(net, clean_set.images[:8])):
        runs.append(synthesize(model, clean_set.images[:200], clean_set.labels[:200], 10, "patch", steps=5,
                               restarts=1, generator=torch.Generator().manual_seed(0), progress=SilentProgress()))
    assert torch.allclose(runs[0].sizes, runs[1].sizes, atol=1e-3)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_a_saved_format_adapter_gets_a_copy_with_parameters_and_the_same_logits(fmt, tmp_path):
    saved = pt2_folder(tmp_path / "pt2", small()) if fmt == "pt2" else script_file(tmp_path / "s.pt", small())
    loaded = load_model(saved).eval()
    x = torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    fast = search_copy(loaded, x)
    assert next(fast.parameters(), None) is not None
    with torch.no_grad():
        assert torch.allclose(fast(x), loaded(x), atol=1e-4)


def test_the_check_allows_tf32_rounding_on_cuda_only(monkeypatch):
    from gradprune_mlflow.defense import searchnet

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert searchnet._tolerance(torch.device("cuda")) == searchnet.TF32_TOLERANCE
    assert searchnet._tolerance(torch.device("cpu")) == searchnet.TOLERANCE < searchnet.TF32_TOLERANCE
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert searchnet._tolerance(torch.device("cuda")) == searchnet.TOLERANCE


def test_a_search_copy_given_back_is_not_copied_again(badnets_cnn, clean_set):
    """One model, several searches (detection, then the fixed-strength blend): one copy, traced once."""
    net = Normalized(copy.deepcopy(badnets_cnn), clean_set.meta.mean, clean_set.meta.std)
    fast = search_copy(net, clean_set.images[:8])
    assert search_copy(fast, clean_set.images[:8]) is fast
    assert search_copy(net, clean_set.images[:8]) is not fast  # the model itself is copied afresh every time
    x = torch.rand(4, 1, 8, 8)
    plain = search_copy(Branchy().eval(), x)  # the fallback copy of a model torch.fx cannot trace
    assert isinstance(plain, Branchy) and search_copy(plain, x) is plain


def test_a_bfloat16_copy_takes_and_gives_float32_and_agrees_with_the_model(badnets_cnn, clean_set):
    net = Normalized(copy.deepcopy(badnets_cnn), clean_set.meta.mean, clean_set.meta.std).eval()
    low = search_copy(net, clean_set.images[:8], "bf16")
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in net.parameters()} == {torch.float32}  # the model itself is not cast
    x = clean_set.images[:200].clone().requires_grad_()
    got = low(x)
    got.logsumexp(1).sum().backward()  # searches need the input's gradient, in the input's own dtype
    assert got.dtype == torch.float32 and x.grad is not None and x.grad.dtype == torch.float32
    with torch.no_grad():
        want = net(clean_set.images[:200])
    assert float((got.detach() - want).abs().max()) <= 0.05 * (float(want.abs().max()) + 1)
    assert float((got.argmax(1) == want.argmax(1)).float().mean()) >= 0.95
    assert search_copy(low, clean_set.images[:8], "bf16") is low


class Constant(nn.Module):
    """A weight held as a plain float32 tensor, not a parameter, in a model torch.fx cannot trace (so the plain copy
    is cast): casting the module leaves it float32, and bfloat16 inputs cannot be multiplied with it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.weight = torch.randn(3, 2)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        if h.mean() > 0:
            h = h.relu()
        return h @ self.weight


class Overflow(nn.Module):
    """Logits that bfloat16's 8 bits move by more than its tolerance: 1 + 1e-3 rounds to 1 before the scale-up."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)

    def forward(self, x):
        return ((self.conv(x).mean((2, 3)) * 1e-3 + 1) - 1) * 1e4


@pytest.mark.parametrize("model", [Constant, Overflow])
def test_a_model_that_does_not_survive_bfloat16_keeps_a_float32_copy(model):
    torch.manual_seed(0)
    net = model().eval()
    x = torch.rand(4, 1, 8, 8)
    copied = search_copy(net, x, "bf16")
    assert {p.dtype for p in copied.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.allclose(copied(x), net(x), atol=1e-3)


def test_auto_precision_is_bfloat16_on_a_gpu_and_timed_on_a_cpu_that_computes_it(monkeypatch):
    from gradprune_mlflow.defense import searchnet
    from gradprune_mlflow.defense.searchnet import resolved_precision

    monkeypatch.setattr(searchnet, "cpu_computes_bf16", lambda: True)
    assert resolved_precision("auto", torch.device("cpu")) == "timed"
    monkeypatch.setattr(searchnet, "cpu_computes_bf16", lambda: False)
    assert resolved_precision("auto", torch.device("cpu")) == "fp32"
    assert resolved_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolved_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolved_precision("auto", torch.device("cuda")) == "bf16"
    assert resolved_precision("fp32", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolved_precision("auto", torch.device("cuda")) == "fp32"


def test_the_detector_flags_the_backdoor_through_a_bfloat16_copy(badnets_cnn, clean_set):
    """The same decision as in float32 (tests/test_sanitize.py): the patch probe flags class 0."""
    from gradprune_mlflow.config import SanitizeConfig
    from gradprune_mlflow.data.cleanset import Split
    from gradprune_mlflow.defense.probes import find_backdoor

    net = Normalized(copy.deepcopy(badnets_cnn), clean_set.meta.mean, clean_set.meta.std).eval()
    data = Split(clean_set.images[::2], clean_set.labels[::2])
    # 40 steps miss it in float32 too; one restart and no warp probe, as bfloat16 is emulated on many CPUs (slow)
    cfg = SanitizeConfig(synth_steps=100, synth_restarts=1, warp_steps=0, search_precision="bf16")
    detection = find_backdoor(net, data, 10, cfg, torch.Generator().manual_seed(0), SilentProgress()).detection
    assert detection.flagged and detection.target == 0 and detection.flagged_by == "patch_probe"


class _Slow(nn.Module):
    """A conv net whose forward pass also sleeps: a copy that is plainly slower than another."""

    def __init__(self, seconds: float):
        super().__init__()
        self.conv, self.seconds = nn.Conv2d(1, 4, 3), seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize(("fp32_sleep", "bf16_sleep", "chosen"), [(0.0, 0.03, "fp32"), (0.03, 0.0, "bf16")])
def test_auto_takes_the_precision_whose_search_step_is_clearly_faster(monkeypatch, fp32_sleep, bf16_sleep, chosen):
    from gradprune_mlflow.defense import searchnet

    monkeypatch.setattr(searchnet, "_TIMED", {})
    example = torch.rand(4, 1, 8, 8)
    assert searchnet.faster_precision(_Slow(fp32_sleep), _Slow(bf16_sleep), example) == chosen


def test_a_near_tie_keeps_float32(monkeypatch):
    from gradprune_mlflow.defense import searchnet

    monkeypatch.setattr(searchnet, "_TIMED", {})
    # the "bf16" copy is 10% faster: short of AUTO_GAIN
    assert searchnet.faster_precision(_Slow(0.033), _Slow(0.03), torch.rand(4, 1, 8, 8)) == "fp32"


def test_auto_on_a_cpu_searches_in_the_precision_it_timed_as_faster(badnets_cnn, clean_set, monkeypatch):
    from gradprune_mlflow.defense import searchnet

    monkeypatch.setattr(searchnet, "_TIMED", {})
    monkeypatch.setattr(searchnet, "cpu_computes_bf16", lambda: True)
    example = clean_set.images[:8]
    copied = search_copy(badnets_cnn, example, "auto")
    assert len(searchnet._TIMED) == 1  # timed once; a second copy of the same architecture reuses the answer
    (timed,) = searchnet._TIMED.values()
    assert searchnet.precision_of(copied) == timed
    assert searchnet.precision_of(search_copy(copy.deepcopy(badnets_cnn), example, "auto")) == timed
    assert len(searchnet._TIMED) == 1
    with torch.no_grad():
        want = badnets_cnn.eval()(example)
        assert (copied(example) - want).abs().max() <= searchnet.BF16_TOLERANCE * (want.abs().max() + 1)


def test_a_cpu_without_bfloat16_instructions_searches_in_float32_untimed(badnets_cnn, clean_set, monkeypatch):
    from gradprune_mlflow.defense import searchnet

    monkeypatch.setattr(searchnet, "_TIMED", {})
    monkeypatch.setattr(searchnet, "cpu_computes_bf16", lambda: False)
    assert searchnet.precision_of(search_copy(badnets_cnn, clean_set.images[:8], "auto")) == "fp32"
    assert searchnet._TIMED == {}


def test_the_timed_copies_take_turns_after_one_warm_up_each():
    from gradprune_mlflow.defense import searchnet

    calls = []

    class Named(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.conv = name, nn.Conv2d(1, 2, 3)

        def forward(self, x):
            calls.append(self.name)
            return self.conv(x).mean((2, 3))

    seconds = searchnet.step_seconds([Named("a"), Named("b")], torch.rand(4, 1, 8, 8), repeats=2)
    assert calls == ["a", "b"] * 3 and len(seconds) == 2 and all(s > 0 for s in seconds)
