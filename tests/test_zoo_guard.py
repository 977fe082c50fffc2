"""Presets' development and test seeds, and the guard that lets a test table be written only for the configuration
of the last development run."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from gradprune_mlflow import lab
from gradprune_mlflow.benchmark import guard, runner
from gradprune_mlflow.benchmark.presets import CLEAN, PRESETS, get_preset
from scripts import benchmark_script


def _compare():
    return benchmark_script("compare")


def test_every_preset_keeps_its_test_seeds_apart_and_names_known_attacks():
    for preset in PRESETS.values():
        assert preset.dev_seeds and not set(preset.dev_seeds) & set(preset.test_seeds), preset.name
        runner.check_attacks(preset.attacks)
    assert get_preset("smoke").seeds("test") == (1,)
    zoo = get_preset("zoo-gpu")
    assert set(zoo.attacks) == {CLEAN, *lab.ATTACKS} and zoo.image == "color32"
    assert set(zoo.archs) == {"resnet18", "mobilenet_v3_small", "vgg11_bn", "efficientnet_b0"}
    clean = get_preset("zoo-clean-cpu")  # the false-positive rate is measured on at least 20 held-out clean models
    assert clean.attacks == (CLEAN,) and len(clean.archs) * len(clean.seeds("test")) >= 20
    with pytest.raises(ValueError, match="unknown split"):
        zoo.seeds("train")
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        runner.check_attacks(("clean", "nope"))


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_code_version_follows_committed_and_uncommitted_changes_of_the_defense_only(tmp_path):
    defense = tmp_path / "gradprune_mlflow" / "defense"
    defense.mkdir(parents=True)
    (defense / "prune.py").write_text("STEP = 1\n")
    (tmp_path / "README.md").write_text("x\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "one")
    first = guard.code_version(tmp_path)
    (tmp_path / "README.md").write_text("y\n")
    assert guard.code_version(tmp_path) == first  # not code that decides what a defense does
    (defense / "prune.py").write_text("STEP = 2\n")
    dirty = guard.code_version(tmp_path)
    assert dirty != first
    _git(tmp_path, "commit", "-qam", "two")
    assert guard.code_version(tmp_path) not in (first, dirty)
    assert guard.code_version(tmp_path / "nowhere") == "no git"


def _rows(path: Path, seeds: tuple[int, ...]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=runner.FIELDS)
        writer.writeheader()
        for seed in seeds:
            writer.writerow({"arch": "small_cnn", "attack": "badnets", "per_class": 20, "seed": seed,
                             "defense": "none", "uses_trigger": False, "clean_acc": 0.9, "asr": 0.9, "ra": 0.1,
                             "acc_before": 0.9, "asr_before": 0.9, "seconds": 1, "backward_passes": 0,
                             "device": "cpu", "info": "{}"})


def test_a_test_table_needs_the_last_dev_runs_configuration_or_a_reason(tmp_path, capsys):
    compare = _compare()
    common = ["--preset", "smoke", "--out", str(tmp_path), "--defenses", "none", "--report-only"]
    _rows(tmp_path / "compare-smoke-test.csv", (1,))
    assert compare.main(common + ["--split", "test"]) == 2  # no development run recorded at all
    assert "no development run" in capsys.readouterr().out
    preset = get_preset("smoke")
    guard.record(tmp_path / "compare-smoke", "dev", guard.configuration(preset, guard.code_version()))
    assert compare.main(common + ["--split", "test"]) == 0
    md = (tmp_path / "compare-smoke-test.md").read_text()
    assert "**Split: test**" in md and "## Tables (test)" in md and "changed" not in md
    capsys.readouterr()
    changed = common + ["--split", "test", "--option", "anp.iterations=7"]
    assert compare.main(changed) == 2
    out = capsys.readouterr().out
    assert "configuration changed after the last development run" in out and "options" in out
    assert compare.main(changed + ["--accept-changed-config", "ANP iterations lowered to fit the machine"]) == 0
    assert "accepted because: ANP iterations lowered to fit the machine" in \
        (tmp_path / "compare-smoke-test.md").read_text()


def test_a_changed_code_version_is_named_in_the_refusal(tmp_path):
    preset = get_preset("smoke")
    guard.record(tmp_path / "compare-smoke", "dev", guard.configuration(preset, "code-a"))
    guard.check_test(tmp_path / "compare-smoke", guard.configuration(preset, "code-a"), None)
    with pytest.raises(guard.ChangedConfig, match="code of gradprune_mlflow/defense"):
        guard.check_test(tmp_path / "compare-smoke", guard.configuration(preset, "code-b"), None)
    # The seeds are what differs between the splits: they are not part of the configuration.
    other_seeds = preset.with_overrides(dev_seeds=[7], test_seeds=[8])
    guard.check_test(tmp_path / "compare-smoke", guard.configuration(other_seeds, "code-a"), None)


@pytest.mark.slow
def test_dev_then_test_runs_label_their_tables_and_keep_seeds_apart(tmp_path, capsys):
    compare = _compare()
    common = ["--preset", "smoke", "--per-class", "5", "--train-images", "600", "--train-epochs", "1",
              "--test-images", "200", "--defenses", "none", "--out", str(tmp_path), "--cache", str(tmp_path / "c")]
    assert compare.main(common) == 0
    assert "**Split: development**" in (tmp_path / "compare-smoke.md").read_text()
    assert compare.main(common + ["--split", "test"]) == 0
    test_md = (tmp_path / "compare-smoke-test.md").read_text()
    assert "**Split: test** (seeds 1)" in test_md and "## Tables (test)" in test_md
    dev_rows = runner.read_rows(tmp_path / "compare-smoke.csv")
    test_rows = runner.read_rows(tmp_path / "compare-smoke-test.csv")
    assert {r["seed"] for r in dev_rows} == {"0"} and {r["seed"] for r in test_rows} == {"1"}
    capsys.readouterr()
    assert compare.main(common + ["--split", "test", "--test-images", "100"]) == 2
    assert "test_images" in capsys.readouterr().out


@pytest.mark.slow
def test_zoo_preset_runs_clean_models_and_writes_the_detection_table(tmp_path):
    # The zoo's code path, smoke-sized: a clean and a backdoored model, one detector with a short search.
    argv = ["--preset", "zoo-cpu-quick", "--attacks", "clean", "badnets", "--defenses", "none", "neural-cleanse",
            "--option", "neural-cleanse.steps=5", "--train-images", "600", "--train-epochs", "1", "--test-images",
            "200", "--out", str(tmp_path), "--cache", str(tmp_path / "c")]
    assert _compare().main(argv) == 0
    rows = runner.read_rows(tmp_path / "compare-zoo-cpu-quick.csv")
    assert {(r["attack"], r["defense"]) for r in rows if not r["error"]} == {
        (a, d) for a in ("clean", "badnets") for d in ("none", "neural-cleanse")}
    assert all('"asr_trigger"' in r["info"] for r in rows if r["attack"] == "clean")
    md = (tmp_path / "compare-zoo-cpu-quick.md").read_text()
    assert "| neural-cleanse | 50 | 1 / 1 |" in md
    clean_table = md.split("### small_cnn, clean, 50 clean images per class")[1].split("###")[0]
    assert "| none |" in clean_table and "| n/a | n/a |" in clean_table  # no ASR, no RA for a clean model
    assert (tmp_path / "compare-zoo-cpu-quick-roc.png").stat().st_size > 5_000


def test_the_log_s_time_left_counts_each_run_at_its_defense_s_mean():
    todo = [runner.Job("small_cnn", a, 0, 50, d) for a in ("clean", "badnets") for d in ("none", "grad-prune-free")]
    eta = runner.Eta(todo, start=0.0)
    assert eta.done(todo[0], 60.0) == "[1/4, 1 min so far, about 3 min left]"  # no free run yet: the overall mean
    assert eta.done(todo[1], 660.0) == "[2/4, 11 min so far, about 11 min left]"  # 60 s + 600 s to go
    assert eta.done(todo[2], 720.0) == "[3/4, 12 min so far, about 10 min left]"
