"""Saved model formats: pt2 (torch.export, MLflow's default), TorchScript, pickle and torch.save files.

Each loads after a scan, is sanitized through its own graph's parameters, and comes back in the format it came in.
The malicious archives here are built by rewriting real archives' records; they are never loaded by the tests: a
canary file that the payload would create shows whether anything ran.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from test_cli import gradprune, lines

from gradprune_mlflow import sanitize
from gradprune_mlflow.defense.masks import FilterMasks
from gradprune_mlflow.defense.triggers import PatchTrigger
from gradprune_mlflow.errors import BadInput, UnsafeModel, UnsupportedModel
from gradprune_mlflow.models.io import load_model, save_model
from gradprune_mlflow.models.pt2 import ExportedModel
from gradprune_mlflow.models.torchscript import ScriptedModel
from gradprune_mlflow.models.zoo import create_model

SHAPE = (1, 28, 28)
# Formats are compared fine-tuning in float32: under train_precision=auto a pt2 program, whose graph autocast gains
# nothing on, keeps float32 where the eager model may take bfloat16 (test_auto_fine_tunes_a_pt2_program_in_float32).
QUICK = {"finetune_epochs": 1, "device": "cpu", "seed": 0, "train_precision": "fp32"}


class RunsShell:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def small(arch: str = "small_cnn") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(arch).eval()


_SAVED: dict[tuple, Path] = {}


def _once(key: tuple, path: Path, save) -> Path:
    """Save each (model, format) once per module and copy it: exporting and logging take seconds each."""
    if key not in _SAVED:
        _SAVED[key] = Path(tempfile.mkdtemp(prefix="formats-")) / "saved"
        save(_SAVED[key])
    if _SAVED[key].is_dir():
        shutil.copytree(_SAVED[key], path)
    else:
        shutil.copyfile(_SAVED[key], path)
    return path


def _arch(model: torch.nn.Module) -> tuple:
    return type(model).__name__, tuple(float(p.sum()) for p in model.parameters())


def pt2_folder(path: Path, model: torch.nn.Module, batch: int = 1) -> Path:
    """An MLflow model saved the way MLflow documents it: pt2 is the default, traced from the input example
    (requirements given, so that MLflow does not load the model again to infer them)."""
    return _once(("pt2", batch, *_arch(model)), path, lambda p: mlflow.pytorch.save_model(
        model, str(p), input_example=torch.rand(batch, *SHAPE).numpy(), pip_requirements=["torch"]))


def script_file(path: Path, model: torch.nn.Module) -> Path:
    torch.jit.save(torch.jit.script(model), path)
    return path


def script_folder(path: Path, model: torch.nn.Module) -> Path:
    return _once(("ts", *_arch(model)), path, lambda p: mlflow.pytorch.save_model(
        torch.jit.script(model), str(p), serialization_format="pickle", pip_requirements=["torch"]))


def probe(n: int = 5) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(1))


def rewrite(archive: Path, replace: dict[str, bytes], out: Path) -> Path:
    """A copy of a zip archive with some records replaced (by their name's ending) or added (full names)."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        names = src.namelist()
        for name in names:
            hit = [k for k in replace if name.endswith(k)]
            dst.writestr(name, replace.pop(hit[0]) if hit else src.read(name))
        for name, data in replace.items():
            dst.writestr(name, data)
    return out


@pytest.mark.parametrize("fmt", ["pt2", "pt2-dynamic", "pt2-fixed-batch", "torchscript-file", "torchscript-traced",
                                 "torchscript-mlflow"])
def test_each_format_loads_as_an_adapter_that_computes_what_the_model_does(tmp_path, fmt):
    model = small()
    if fmt == "pt2-fixed-batch":  # exported for batches of exactly 3: run in chunks of 3, the last one padded
        torch.export.save(torch.export.export(model, (probe(3),)), tmp_path / "m.pt2")
        loaded = load_model(tmp_path / "m.pt2")
        assert isinstance(loaded, ExportedModel) and (loaded.min_batch, loaded.max_batch) == (3, 3)
    elif fmt.startswith("pt2"):
        loaded = load_model(pt2_folder(tmp_path / "m", model, batch=4 if fmt == "pt2-dynamic" else 1))
        assert isinstance(loaded, ExportedModel) and loaded.per_image == (fmt == "pt2")
    elif fmt == "torchscript-file":
        loaded = load_model(script_file(tmp_path / "m.pt", model))
        assert isinstance(loaded, ScriptedModel)
    elif fmt == "torchscript-traced":
        torch.jit.save(torch.jit.trace(model, probe(2)), tmp_path / "m.pt")
        loaded = load_model(tmp_path / "m.pt")
        assert isinstance(loaded, ScriptedModel)
    else:
        loaded = load_model(script_folder(tmp_path / "m", model))
        assert isinstance(loaded, ScriptedModel)
    with torch.no_grad():
        for n in (1, 2, 7):  # a one-image export takes any batch size through the adapter
            torch.testing.assert_close(loaded(probe(n)), model(probe(n)), rtol=1e-5, atol=1e-6)
    # The filters are the eager model's, by the same names, each with the BatchNorm that follows it.
    eager = FilterMasks(model, torch.zeros(1, *SHAPE))
    masks = FilterMasks(loaded, torch.zeros(1, *SHAPE))
    assert list(masks.convs) == list(eager.convs) == ["features.0", "features.4"]
    assert set(masks.bns) == set(eager.bns)
    for name, conv in masks.convs.items():
        assert torch.equal(conv.weight, eager.convs[name].weight)
        assert torch.equal(masks.bns[name].bias, eager.bns[name].bias)


def test_filters_of_a_residual_net_and_a_net_without_batchnorm(tmp_path):
    for arch in ("tiny_resnet", "small_cnn_nobn"):
        model = small(arch)
        eager = FilterMasks(model, torch.zeros(1, *SHAPE))
        for loaded in (load_model(pt2_folder(tmp_path / f"{arch}-pt2", model)),
                       load_model(script_file(tmp_path / f"{arch}.pt", model))):
            masks = FilterMasks(loaded, torch.zeros(1, *SHAPE))
            assert list(masks.convs) == list(eager.convs)
            assert set(masks.bns) == set(eager.bns)


class GatedNet(torch.nn.Module):
    """A conv whose zeros pass a squeeze-excitation gate (sigmoid(0) = 0.5 is not zero) and a conv classifier."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.gate = torch.nn.Conv2d(8, 8, 1)
        self.classifier = torch.nn.Conv2d(8, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        return self.classifier(x).mean((2, 3))


def test_convs_a_zero_does_not_cancel_are_left_unpruned_and_named(tmp_path):
    model = GatedNet().eval()
    for loaded in (load_model(pt2_folder(tmp_path / "pt2", model)), load_model(script_file(tmp_path / "s.pt", model))):
        masks = FilterMasks(loaded, torch.zeros(1, *SHAPE))
        assert list(masks.convs) == ["conv"] and list(masks.bns) == ["conv"]
        reasons = {u["layer"]: u["reason"] for u in masks.unprunable}
        assert set(reasons) == {"gate", "classifier"}
        assert "sigmoid" in reasons["gate"] and "output" in reasons["classifier"]
        masks.prune("conv", [0, 5], step=1)
        with torch.no_grad():
            out = loaded(probe(2))
            masks.convs["conv"].weight[0].normal_()  # masks hold: a pruned filter written to is zeroed again
            masks.apply()
            torch.testing.assert_close(loaded(probe(2)), out, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_format_sanitizes_to_the_same_weights_as_the_eager_model(tmp_path):
    model = small()
    trigger = PatchTrigger(0, size=3, location="bottom-right").build(SHAPE)
    from gradprune_mlflow import lab
    from gradprune_mlflow.data.cleanset import load_clean_set

    clean = load_clean_set(lab.trusted_clean_set(tmp_path / "clean", per_class=10, seed=0))
    eager = sanitize(model, clean, trigger, **QUICK)
    for loaded in (load_model(pt2_folder(tmp_path / "pt2", model)), load_model(script_file(tmp_path / "s.pt", model))):
        result = sanitize(loaded, clean, trigger, **QUICK)
        assert result.report["model_format"] == loaded.model_format
        # the same filters pruned in the same order; a graph's gradients may differ from the eager ones in the last bits
        pruned = [(h["layer"], h["filter"], h["step"]) for h in result.history]
        assert pruned == [(h["layer"], h["filter"], h["step"]) for h in eager.history]
        assert [h["score"] for h in result.history] == pytest.approx([h["score"] for h in eager.history], rel=1e-5)
        want = eager.model.state_dict()
        for key, value in result.model.inner.state_dict().items():
            torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert eager.report["model_format"] == "module"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_auto_fine_tunes_a_pt2_program_in_float32(tmp_path):
    from gradprune_mlflow import lab
    from gradprune_mlflow.data.cleanset import load_clean_set

    clean = load_clean_set(lab.trusted_clean_set(tmp_path / "clean", per_class=10, seed=0))
    trigger = PatchTrigger(0, size=3, location="bottom-right").build(SHAPE)
    loaded = load_model(pt2_folder(tmp_path / "pt2", small()))
    report = sanitize(loaded, clean, trigger, **{**QUICK, "train_precision": "auto"}).report
    assert report["model_format"] == "pt2" and report["train_precision"] == "fp32"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trigger_free_mode_runs_on_pt2_and_torchscript(tmp_path):
    """Synthesis optimises triggers through the model with its weights frozen: through vmap and a script too."""
    from gradprune_mlflow import lab
    from gradprune_mlflow.data.cleanset import load_clean_set

    clean = load_clean_set(lab.trusted_clean_set(tmp_path / "clean", per_class=5, seed=0))
    tiny = {**QUICK, "synth_steps": 3, "synth_restarts": 1, "recheck_rounds": 1, "fixed_blend_steps": 3,
            "on_clean": "sanitize"}
    for loaded in (load_model(pt2_folder(tmp_path / "pt2", small())), load_model(script_file(tmp_path / "s.pt",
                                                                                             small()))):
        result = sanitize(loaded, clean, None, **tiny)
        assert result.report["trigger_source"] == "synthesized" and result.model is not None
        assert all(p.requires_grad for p in result.model.parameters())
        weights = dict(result.model.inner.named_parameters())
        for entry in result.history:
            assert weights[entry["layer"] + ".weight"][entry["filter"]].abs().sum() == 0


def _pruned(tmp_path, source_dir: Path) -> ExportedModel:
    """The loaded model with filter 3 of the first conv pruned and other weights changed, as sanitizing does."""
    loaded = load_model(source_dir)
    masks = FilterMasks(loaded, torch.zeros(1, *SHAPE))
    masks.prune("features.0", [3], step=1)
    with torch.no_grad():
        masks.convs["features.4"].weight.mul_(0.5)
    return loaded


def test_pt2_comes_back_as_pt2_with_the_source_folder_kept(tmp_path):
    source = pt2_folder(tmp_path / "src", small())
    loaded = _pruned(tmp_path, source)
    out = save_model(loaded, tmp_path / "out" / "model", input_shape=SHAPE, history=[{"layer": "features.0"}])
    for rel in ("MLmodel", "input_example.json", "serving_input_example.json", "requirements.txt"):
        assert (out / rel).read_bytes() == (source / rel).read_bytes(), rel
    assert json.loads((out / "pruning_history.json").read_text()) == [{"layer": "features.0"}]
    again = mlflow.pytorch.load_model(str(out))  # MLflow's own loader: a GraphModule of the exported program
    x = probe(1)
    with torch.no_grad():
        torch.testing.assert_close(again(x), loaded(x), rtol=0, atol=0)
    state = again.state_dict()
    assert state["features.0.weight"][3].abs().sum() == 0 and state["features.1.bias"][3] == 0
    # The graph is the one exported, op for op; only the weights changed.
    before = torch.export.load(source / "data" / "model.pt2")
    after = torch.export.load(out / "data" / "model.pt2")
    assert str(after.graph) == str(before.graph)
    assert not torch.equal(after.state_dict["features.4.weight"], before.state_dict["features.4.weight"])


@pytest.mark.parametrize("where", ["file", "mlflow"])
def test_torchscript_comes_back_as_torchscript(tmp_path, where):
    model = small()
    source = script_file(tmp_path / "src.pt", model) if where == "file" else script_folder(tmp_path / "src", model)
    loaded = _pruned(tmp_path, source)
    out = save_model(loaded, tmp_path / "out" / "model", input_shape=SHAPE)
    if where == "file":
        assert out == tmp_path / "out" / "model.pt"
        again = torch.jit.load(out)
    else:
        assert (out / "MLmodel").read_bytes() == (source / "MLmodel").read_bytes()
        again = mlflow.pytorch.load_model(str(out))
    assert isinstance(again, torch.jit.ScriptModule)
    x = probe()
    with torch.no_grad():
        torch.testing.assert_close(again(x), loaded(x), rtol=0, atol=0)
    assert again.state_dict()["features.0.weight"][3].abs().sum() == 0


def test_training_mode_export_is_refused(tmp_path):
    model = small().train()
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(2, *SHAPE),)), path)
    with pytest.raises(UnsupportedModel, match="exported in training mode"):
        load_model(path)


def test_pt2_file_round_trip(tmp_path):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(small(), (torch.rand(1, *SHAPE),)), path)
    loaded = _pruned(tmp_path, path)
    out = save_model(loaded, tmp_path / "out" / "model", input_shape=SHAPE)
    assert out.name == "model.pt2"
    again = torch.export.load(out).module()
    with torch.no_grad():
        torch.testing.assert_close(again(probe(1)), loaded(probe(1)), rtol=0, atol=0)


# -- unsafe archives: refused before anything in them is loaded ---------------------------------------------------

def _evil_pt2(tmp_path, canary, where: str) -> Path:
    source = pt2_folder(tmp_path / "src", small())
    buf = io.BytesIO()
    torch.save({"x": RunsShell(f"touch {canary}")}, buf)
    archive = source / "data" / "model.pt2"
    if where == "sample-inputs":  # torch.export.load unpickles the sample inputs
        rewrite(archive, {"sample_inputs/model.pt": buf.getvalue()}, tmp_path / "evil.pt2")
    elif where == "custom-object":  # an opaque object record is always unpickled
        rewrite(archive, {"model/data/constants/custom_obj_0": pickle.dumps(RunsShell(f"touch {canary}"))},
                tmp_path / "evil.pt2")
    else:  # a weight the config says is pickled
        with zipfile.ZipFile(archive) as z:
            config = json.loads(z.read("model/data/weights/model_weights_config.json"))
        config["config"]["features.0.weight"]["use_pickle"] = True
        rewrite(archive, {"weights/model_weights_config.json": json.dumps(config).encode(),
                          "weights/weight_0": pickle.dumps(RunsShell(f"touch {canary}"), protocol=2)},
                tmp_path / "evil.pt2")
    (tmp_path / "evil.pt2").replace(archive)
    return source


@pytest.mark.parametrize("where", ["sample-inputs", "custom-object", "pickled-weight"])
def test_pt2_with_a_malicious_record_is_refused_unloaded(tmp_path, where):
    canary = tmp_path / "CANARY"
    source = _evil_pt2(tmp_path, canary, where)
    with pytest.raises(UnsafeModel, match="os.system") as err:
        load_model(source)
    assert err.value.exit_code == 3 and "\n" not in str(err.value)
    assert not canary.exists()


@pytest.mark.parametrize("record", ["data.pkl", "constants.pkl"])
def test_torchscript_with_a_malicious_pickle_is_refused_unloaded(tmp_path, record):
    canary = tmp_path / "CANARY"
    source = script_file(tmp_path / "src.pt", small())
    evil = rewrite(source, {record: pickle.dumps(RunsShell(f"touch {canary}"), protocol=2)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeModel, match="os.system"):
        load_model(evil)
    folder = script_folder(tmp_path / "mlflow", small())
    rewrite(evil, {}, folder / "data" / "model.pth")
    with pytest.raises(UnsafeModel, match="os.system"):
        load_model(folder)
    assert not canary.exists()


def test_compiled_code_and_duplicate_records_are_refused(tmp_path):
    source = pt2_folder(tmp_path / "src", small()) / "data" / "model.pt2"
    with pytest.raises(UnsafeModel, match="compiled code"):
        load_model(rewrite(source, {"model/data/aotinductor/model/model.so": b"\x7fELF"}, tmp_path / "so.pt2"))
    dup = tmp_path / "dup.pt2"
    rewrite(source, {}, dup)
    with zipfile.ZipFile(dup, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("model/models/model.json", b"{}")
    with pytest.raises(UnsafeModel, match="two records of the same name"):
        load_model(dup)


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_damaged_archives_are_bad_input(tmp_path, fmt, damage):
    path = pt2_folder(tmp_path / "src", small()) / "data" / "model.pt2" if fmt == "pt2" else \
        script_file(tmp_path / "src.pt", small())
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 3
        data[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="damaged zip archive"):
        load_model(path)


# -- the command line ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_sanitizes_pt2_and_torchscript_in_their_own_format(tmp_path):
    from gradprune_mlflow import lab

    clean_set_dir = lab.trusted_clean_set(tmp_path / "clean", per_class=10)
    (tmp_path / "patch.json").write_text(json.dumps({"kind": "patch", "target": 0, "size": 3,
                                                      "location": "bottom-right"}))
    model = small()
    for name, source, written in (("pt2", pt2_folder(tmp_path / "pt2", model), "model"),
                                  ("torchscript", script_file(tmp_path / "s.pt", model), "model.pt")):
        out = tmp_path / f"out-{name}"
        done = gradprune("sanitize", str(source), "--clean-data", str(clean_set_dir), "--trigger",
                         str(tmp_path / "patch.json"), "--out", str(out), "--device", "cpu",
                         "--set", "finetune_epochs=1", "--set", "max_prune_fraction=0.05")
        assert done.returncode == 0, done.stderr
        assert json.loads((out / "report.json").read_text())["model_format"] == name
        again = mlflow.pytorch.load_model(str(out / written)) if name == "pt2" else torch.jit.load(out / written)
        with torch.no_grad():
            assert again(probe(1)).shape == (1, 10)


@pytest.mark.slow
def test_cli_refuses_unsafe_and_damaged_archives_with_one_line(tmp_path, clean_set_dir):
    canary = tmp_path / "CANARY"
    evil = _evil_pt2(tmp_path, canary, "sample-inputs")
    done = gradprune("sanitize", str(evil), "--clean-data", str(clean_set_dir), "--out", str(tmp_path / "out"))
    assert done.returncode == 3, done.stderr
    assert len(lines(done.stderr)) == 1 and "os.system" in done.stderr and "Traceback" not in done.stderr
    assert not canary.exists()
    broken = script_file(tmp_path / "s.pt", small())
    broken.write_bytes(broken.read_bytes()[:1000])
    done = gradprune("sanitize", str(broken), "--clean-data", str(clean_set_dir), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert len(lines(done.stderr)) == 1 and "damaged zip archive" in done.stderr
