"""The `gradprune` command: exit codes, the one-line error contract, progress bars, and a full sanitize run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from gradprune_mlflow.cli import app, run_guarded
from gradprune_mlflow.cli.progress import RichProgress, terminal_progress
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.errors import DataError
from gradprune_mlflow.models.zoo import create_model

SCHEMA_1_KEYS = {"schema", "mode", "device", "seconds", "trigger_source", "asr_measured_with", "detection", "before",
                 "after", "pruned_filters", "total_filters", "gradient_passes", "evaluated_on"}
METRICS = {"clean_accuracy", "attack_success_rate", "robust_accuracy", "clean_target_rate"}
PATCH = {"kind": "patch", "target": 0, "size": 3, "location": "bottom-right"}


def gradprune(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script (or `python -m gradprune_mlflow.cli` where there is none)."""
    script = Path(sys.executable).with_name("gradprune")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "gradprune_mlflow.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, **(env or {})})


class RunsShell:
    """Unpickling this runs a shell command (see test_modelio)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def model_file(tmp_path) -> Path:
    torch.save(create_model("small_cnn").eval(), tmp_path / "model.pt")
    return tmp_path / "model.pt"


def test_help_lists_sanitize_and_its_flags(runner):
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "sanitize" in top.stdout
    sub = runner.invoke(app, ["sanitize", "--help"])
    assert sub.exit_code == 0
    for flag in ("--clean-data", "--test-data", "--trigger", "--eval-trigger", "--out", "--mode", "--device",
                 "--seed", "--on-clean", "--on-suspect", "--set"):
        assert flag in sub.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sanitize", "m.pt"], "Missing option '--clean-data'"),
        (["sanitize", "m.pt", "--clean-data", "d", "--mode", "slow"], "'slow' is not one of 'fast', 'paper'"),
        (["sanitize", "m.pt", "--clean-data", "d", "--device", "tpu"], "'tpu' is not one of"),
        (["sanitize", "m.pt", "--clean-data", "d", "--seed", "x"], "--seed"),
        (["sanitize", "m.pt", "--clean-data", "d", "--frobnicate"], "No such option: --frobnicate"),
        (["sanitize", "m.pt", "--clean-data", "d", "--set", "finetune_epochs"], "--set takes KEY=VALUE"),
        (["sanitize", "m.pt", "--clean-data", "d", "--set", "finetune_epochs=0"], "finetune_epochs must be"),
        (["sanitize", "m.pt", "--clean-data", "d", "--set", "warp=9"], "unknown setting(s) ['warp']"),
        (["sanitize", "m.pt", "--clean-data", "d", "--set", "mode=paper"], "use --mode instead"),
        (["sanitize", "m.pt", "--clean-data", "d", "--set", "on_suspect=sanitize"], "use --on-suspect instead"),
        (["sanitize", "m.pt", "--clean-data", "d", "--on-suspect", "maybe"], "'maybe' is not one of 'report'"),
        (["nonsense"], "No such command 'nonsense'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(runner, args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert len(lines(result.stderr)) == 1, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stdout == ""


def test_missing_clean_data_exits_2(runner, model_file, tmp_path):
    result = runner.invoke(app, ["sanitize", str(model_file), "--clean-data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert len(lines(result.stderr)) == 1
    assert result.stderr.startswith("error: clean data") and "nowhere is not a folder" in result.stderr


def test_bad_trigger_file_exits_2(runner, model_file, tmp_path):
    (tmp_path / "t.json").write_text('{"kind": "patch", "target": 0, "location": "middle"}')
    result = runner.invoke(app, ["sanitize", str(model_file), "--clean-data", str(tmp_path), "--trigger",
                                 str(tmp_path / "t.json")])
    assert result.exit_code == 2
    assert len(lines(result.stderr)) == 1 and "patch location 'middle'" in result.stderr


def test_clean_set_failing_validation_exits_2(runner, model_file, clean_set_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("dataset.json", "manifest.csv"):
        (broken / name).write_bytes((clean_set_dir / name).read_bytes())
    result = runner.invoke(app, ["sanitize", str(model_file), "--clean-data", str(broken)])
    assert result.exit_code == 2
    assert len(lines(result.stderr)) == 1 and "failed validation" in result.stderr


@pytest.mark.slow
def test_unsafe_model_file_exits_3_with_one_line_and_runs_nothing(tmp_path, clean_set_dir):
    canary = tmp_path / "CANARY"
    model = create_model("small_cnn")
    model.payload = RunsShell(f"touch {canary}")
    torch.save(model, tmp_path / "evil.pt")
    done = gradprune("sanitize", str(tmp_path / "evil.pt"), "--clean-data", str(clean_set_dir),
                     "--out", str(tmp_path / "out"))
    assert done.returncode == 3, done.stderr
    assert lines(done.stderr) == ["error: model file evil.pt imports os.system: refused without loading; only load "
                                  "models from sources you trust"]
    assert "Traceback" not in done.stdout + done.stderr
    assert not canary.exists()
    assert not (tmp_path / "out").exists()


def test_internal_errors_are_one_line_unless_debugging(capsys, monkeypatch):
    def broken():
        raise RuntimeError("disk on fire")

    monkeypatch.delenv("GRADPRUNE_DEBUG", raising=False)
    assert run_guarded(broken) == 1
    err = capsys.readouterr().err
    assert lines(err) == ["internal error: RuntimeError: disk on fire; rerun with GRADPRUNE_DEBUG=1 for the traceback"]

    monkeypatch.setenv("GRADPRUNE_DEBUG", "1")
    assert run_guarded(broken) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("for the traceback")


def test_expected_errors_keep_their_exit_code_and_fold_to_one_line(capsys):
    def bad_data():
        raise DataError("manifest.csv row 3: label 12 is outside 0..9\nsecond line")

    assert run_guarded(bad_data) == 2
    assert lines(capsys.readouterr().err) == ["error: manifest.csv row 3: label 12 is outside 0..9 second line"]


def test_rich_progress_shows_phases_and_numbers():
    buffer = io.StringIO()
    bars = RichProgress(Console(file=buffer, force_terminal=True, width=120))
    bars.phase("pruning", total=4)
    bars.advance(1, val_acc=0.8125, loss=1.5)
    bars.advance(1, val_acc=0.75, loss=0.25)
    bars.phase("fine-tuning", total=30)
    bars.advance(3, loss=0.125)
    bars.close()
    bars.close()  # the defense and the CLI both close it
    shown = buffer.getvalue()
    assert "pruning" in shown and "fine-tuning" in shown
    assert "val_acc=0.75" in shown and "loss=0.125" in shown
    assert "2/2" in shown, "a phase that ends early shows the steps it took"


def test_no_bars_off_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(terminal_progress(), SilentProgress)


@pytest.mark.slow
def test_full_sanitize_writes_report_and_a_loadable_model(tmp_path, badnets_cnn, clean_set_dir):
    torch.save(badnets_cnn, tmp_path / "badnets.pt")
    (tmp_path / "patch.json").write_text(json.dumps(PATCH))
    out = tmp_path / "out"
    done = gradprune("sanitize", str(tmp_path / "badnets.pt"), "--clean-data", str(clean_set_dir),
                     "--trigger", str(tmp_path / "patch.json"), "--eval-trigger", str(tmp_path / "patch.json"),
                     "--out", str(out), "--mode", "fast", "--device", "cpu", "--seed", "0",
                     "--set", "finetune_epochs=12", "--set", "max_prune_fraction=0.2")
    assert done.returncode == 0, done.stderr
    assert "attack success rate" in done.stdout and str(out / "report.json") in done.stdout

    report = json.loads((out / "report.json").read_text())
    assert SCHEMA_1_KEYS <= set(report)
    assert report["schema"] == 1 and report["mode"] == "fast" and report["device"] == "cpu"
    assert report["config"]["finetune_epochs"] == 12 and report["config"]["max_prune_fraction"] == 0.2
    assert report["finetune_epochs"] <= 12
    assert report["distill_weight"] == report["config"]["distill_weight"]  # no warp unlearned: the setting as given
    assert report["away_weight"] == report["config"]["away_weight"] == 3.0  # a known trigger: its target is known
    assert report["trigger_source"] == "known" and report["asr_measured_with"] == "eval"
    assert report["detection"] is None and report["evaluated_on"] == "validation"
    for when in ("before", "after"):
        assert set(report[when]) >= METRICS and all(0 <= report[when][k] <= 1 for k in METRICS)
    assert report["before"]["attack_success_rate"] > 0.8, "the fixture model should carry the backdoor"
    assert report["after"]["attack_success_rate"] < report["before"]["attack_success_rate"]
    assert 0 <= report["pruned_filters"] <= report["total_filters"]

    history = json.loads((out / "pruning_history.json").read_text())
    assert isinstance(history, list) and len(history) == report["pruned_filters"]
    sanitized = mlflow.pytorch.load_model(str(out / "model"))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert sanitized(x).shape == (4, 10)
        assert not torch.equal(sanitized(x), badnets_cnn(x))


def test_outputs_when_nothing_was_flagged(tmp_path, capsys):
    from gradprune_mlflow.api import SanitizeResult
    from gradprune_mlflow.cli.sanitize import print_summary, write_outputs
    from gradprune_mlflow.defense.triggers import PatchTrigger, load_trigger
    from gradprune_mlflow.defense.warp import FlowTrigger
    from gradprune_mlflow.models.io import save_model

    out = tmp_path / "out"
    save_model(create_model("small_cnn"), out / "model", input_shape=(1, 28, 28))  # an earlier run's model
    candidate = PatchTrigger(7, size=2, location="top-left").build((1, 28, 28))
    report = {"schema": 1, "mode": "fast", "device": "cpu", "seconds": 3.5, "trigger_source": "synthesized",
              "asr_measured_with": "synthesized", "detection": {"target": 7, "anomaly_index": 1.4, "flagged": False},
              "before": {"clean_accuracy": 0.9, "attack_success_rate": 0.1, "robust_accuracy": 0.8}, "after": None,
              "pruned_filters": 0, "total_filters": 48, "gradient_passes": 0, "evaluated_on": "validation"}
    warp = FlowTrigger(7, torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0)))
    result = SanitizeResult(None, report, [], [], [candidate, warp])
    written = write_outputs(result, out, input_shape=(1, 28, 28))
    print_summary(result, written)

    assert json.loads((out / "report.json").read_text()) == report
    assert not (out / "model").exists(), "a stale model must not sit beside a report that wrote none"
    saved = load_trigger(out / "triggers" / "class7-0.json")
    x = torch.rand(2, 1, 28, 28)
    assert saved.target == 7 and torch.equal(saved.apply(x), candidate.apply(x))
    saved_warp = load_trigger(out / "triggers" / "class7-1.json")  # the warp probe's warps are written too
    assert saved_warp.kind == "synthesized-warp" and torch.allclose(saved_warp.apply(x), warp.apply(x), atol=1e-4)
    shown = capsys.readouterr().out
    assert "class 7 not flagged (anomaly index 1.40)" in shown
    assert "no model written" in shown and "90.0%" in shown


def test_a_suspect_model_exits_5_with_its_score_and_writes_no_model(tmp_path, clean_cnn, clean_set_dir):
    """A trained clean model, with thresholds set so that any evidence is suspect and none flags: the plumbing from
    score to exit code."""
    torch.save(clean_cnn, tmp_path / "clean.pt")
    out = tmp_path / "out"
    done = gradprune("sanitize", str(tmp_path / "clean.pt"), "--clean-data", str(clean_set_dir), "--out", str(out),
                     "--device", "cpu", "--set", "suspect_threshold=0.001", "--set", "flag_threshold=0.999",
                     "--set", "synth_steps=10", "--set", "synth_restarts=1")
    assert done.returncode == 5, done.stderr
    assert lines(done.stderr) == [lines(done.stderr)[0]] and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: suspect, not flagged: flag score ")
    assert "no model written" in done.stderr and "--on-suspect sanitize" in done.stderr
    report = json.loads((out / "report.json").read_text())
    score = report["detection"]["score"]
    assert score["verdict"] == "suspect" and 0.001 <= score["value"] < 0.999 and not report["detection"]["flagged"]
    assert set(score["contributions"]) == {"patch_probe", "noise_probe", "warp_probe", "blend_anomaly"}
    assert not (out / "model").exists()
    assert "suspect: flag score" in done.stdout


def test_a_suspect_model_is_sanitized_with_on_suspect_sanitize(tmp_path, clean_cnn, clean_set_dir):
    """The same suspect evidence as above, with --on-suspect sanitize: the top candidate is unlearned and a model
    written, and the report keeps the suspect verdict beside it."""
    torch.save(clean_cnn, tmp_path / "clean.pt")
    out = tmp_path / "out"
    done = gradprune("sanitize", str(tmp_path / "clean.pt"), "--clean-data", str(clean_set_dir), "--out", str(out),
                     "--device", "cpu", "--on-suspect", "sanitize", "--set", "suspect_threshold=0.001",
                     "--set", "flag_threshold=0.999", "--set", "synth_steps=10", "--set", "synth_restarts=1",
                     "--set", "finetune_epochs=2", "--set", "recheck_rounds=0", "--set", "verify=false")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["detection"]["score"]["verdict"] == "suspect" and not report["detection"]["flagged"]
    assert report["config"]["on_suspect"] == "sanitize" and report["config"]["on_clean"] == "skip"
    assert report["sanitized"] and report["after"] is not None and report["away_weight"] == 0.0
    # the stamp that moves images to the most classes is unlearned beside the top candidate's triggers
    square = report["detection"]["spread_square"]
    assert square["fill"] in ("white", "black") and 0.0 <= square["spread"] <= square["moved"] <= 1.0
    plan = {part["trigger"]: part["share"] for part in report["unlearning_plan"]}
    assert plan[f"spread-{square['fill']}"] == pytest.approx(0.25, abs=1e-3)
    assert (out / "model").is_dir()
    assert "suspect: flag score" in done.stdout


def test_every_sub_command_module_imports_and_registers():
    import importlib

    import typer

    import gradprune_mlflow.cli as cli

    names = set()
    for name in cli.COMMANDS:
        module = importlib.import_module(f"gradprune_mlflow.cli.{name}")
        fresh = typer.Typer()
        module.register(fresh)
        added = [c.name for c in fresh.registered_commands] + [g.name for g in fresh.registered_groups]
        assert added, f"cli/{name}.py registered no command"
        names.update(added)
    assert {"sanitize", "dataset", "scan", "webhook", "serve", "demo"} <= names
    shown = typer.main.get_command(app).commands
    assert names <= set(shown)


def test_a_sub_command_module_that_does_not_import_is_an_error(monkeypatch):
    import typer

    import gradprune_mlflow.cli as cli

    monkeypatch.setattr(cli, "app", typer.Typer())  # the real app stays as it is
    monkeypatch.setattr(cli, "COMMANDS", ["no_such_command"])
    with pytest.raises(ImportError, match="gradprune_mlflow.cli.no_such_command"):
        cli._register_all()
