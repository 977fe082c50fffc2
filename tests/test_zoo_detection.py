"""The detection table's arithmetic on hand-made rows: AUROC by ranks, the ROC curve and the rates at the
detectors' own thresholds."""

from __future__ import annotations

import itertools
import json

import pytest

from gradprune_mlflow.benchmark import detection, tables


def _row(attack: str, score: float, flagged: bool, detected: int, defense: str = "neural-cleanse",
         per_class: int = 20, seed: int = 0, **info) -> dict[str, str]:
    return {"arch": "small_cnn", "attack": attack, "per_class": str(per_class), "seed": str(seed),
            "defense": defense, "clean_acc": "0.9", "asr": "0.5", "ra": "0.4", "acc_before": "0.9",
            "asr_before": "0.5", "seconds": "1", "backward_passes": "1", "flagged": str(flagged), "error": "",
            "info": json.dumps({"anomaly_index": score, "detected_target": detected, **info})}


def _pairwise_auroc(neg: list[float], pos: list[float]) -> float:
    # The definition the rank formula must agree with: P(positive > negative) + P(tie) / 2.
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_by_ranks_matches_the_pairwise_definition_with_ties():
    neg, pos = [0.5, 1.0, 2.0, 2.0, 3.5], [2.0, 4.0, 1.0, 6.0]
    assert detection.auroc(neg, pos) == pytest.approx(_pairwise_auroc(neg, pos))
    assert detection.auroc([0, 1], [2, 3]) == 1.0 and detection.auroc([2, 3], [0, 1]) == 0.0
    assert detection.auroc([1, 1], [1]) == 0.5
    assert detection.auroc([], [1.0]) is None and detection.auroc([1.0], []) is None


def test_roc_runs_from_nothing_flagged_to_everything_flagged():
    points = detection.roc([0.0, 1.0], [1.0, 3.0])
    assert points == [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]
    fpr, tpr = zip(*points, strict=True)
    assert list(fpr) == sorted(fpr) and list(tpr) == sorted(tpr)


def test_rates_count_false_positives_right_targets_and_all_to_all_apart():
    rows = [
        _row("clean", 0.5, False, 3), _row("clean", 2.5, True, 4, seed=1), _row("clean", 1.0, False, 2, seed=2),
        _row("badnets", 4.0, True, 0), _row("badnets", 3.0, True, 7, seed=1), _row("badnets", 0.8, False, 0, seed=2),
        _row("badnets-all-to-all", 1.5, True, 5), _row("badnets-all-to-all", 0.2, False, 1, seed=1),
    ]
    got = detection.rates(detection.cases(rows, "neural-cleanse"))
    assert (got["clean"], got["backdoored"]) == (3, 5)
    assert got["false_positive"] == (1, 3)
    assert got["detected"] == (3, 5)
    assert got["right_target"] == (1, 3)  # flagged at class 0 once; the other flag named class 7
    assert got["all_to_all_flagged"] == (1, 2)
    neg, pos = [0.5, 2.5, 1.0], [4.0, 3.0, 0.8, 1.5, 0.2]
    assert got["auroc"] == pytest.approx(_pairwise_auroc(neg, pos))


def test_detection_markdown_lists_each_budget_and_skips_rows_without_a_detection(tmp_path):
    rows = [_row("clean", 0.5, False, 3), _row("badnets", 4.0, True, 0),
            _row("clean", 0.5, False, 3, per_class=50), _row("badnets", 0.1, False, 2, per_class=50),
            {**_row("badnets", 9.0, True, 0, seed=3), "error": "RuntimeError: boom"},
            {**_row("badnets", 9.0, True, 0, defense="grad-prune-free", seed=4), "flagged": ""}]
    md = detection.markdown(rows, "x-roc.png")
    assert "| neural-cleanse | 20 | 1 / 1 | 1.000 | 0/1 (0%) | 1/1 (100%) | 0 / 0 | 1/1 (100%) | n/a |" in md
    assert "| neural-cleanse | 50 | 1 / 1 | 0.000 | 0/1 (0%) | 0/1 (0%) | 0 / 0 | 0/1 (0%) | n/a |" in md
    assert "grad-prune-free |" not in md.split("<details>")[0]  # its only row has no `flagged`
    assert detection.plot(rows, tmp_path / "roc.png").stat().st_size > 5_000
    assert "ROC curves: [x-roc.png](x-roc.png)" in md


def test_grad_prune_is_scored_by_its_flag_score_and_suspect_models_are_counted_apart():
    # the anomaly index would rank these the other way round: the table must read the flag score
    rows = [_row("clean", 9.0, False, 3, defense="grad-prune-detect", flag_score=0.2, verdict="clean"),
            _row("clean", 8.0, False, 6, defense="grad-prune-detect", seed=1, flag_score=0.41, verdict="suspect"),
            _row("wanet", 0.5, False, 0, defense="grad-prune-detect", flag_score=0.42, verdict="suspect"),
            _row("blend", 0.1, True, 0, defense="grad-prune-detect", flag_score=0.9, verdict="flagged")]
    got = detection.rates(detection.cases(rows, "grad-prune-detect"))
    assert got["auroc"] == 1.0 and got["suspect"] == (1, 1) and got["right_target"] == (1, 2)
    md = detection.markdown(rows, None)
    assert "| grad-prune-detect | 20 | 2 / 2 | 1.000 | 0/2 (0%) | 1/2 (50%) | 1 / 1 | 1/2 (50%) | n/a |" in md
    assert ("| grad-prune-detect | small_cnn | wanet | 0 | 20 | 0.420 | suspect | 0 | 0 | 50.0 -> 50.0 | 90.0 -> 90.0 "
            "|  |") in md


def test_every_model_s_row_shows_what_sanitizing_did_and_the_verification():
    rows = [{**_row("badnets", 0.5, True, 0, defense="grad-prune-detect", flag_score=0.7, verdict="flagged",
                    verification="failed"), "asr_before": "0.957", "asr": "0.022", "acc_before": "0.794",
             "clean_acc": "0.7935"},
            {**_row("clean", 0.5, False, 6, defense="grad-prune-detect", seed=1, flag_score=0.3, verdict="clean"),
             "asr_before": "0.01", "asr": "0.01"}]
    md = detection.markdown(rows, None)
    assert "| 0.700 | True | 0 | 0 | 95.7 -> 2.2 | 79.4 -> 79.3 | failed |" in md
    # a clean model's ASR (measured with some attack's trigger) is no attack's: left blank, as in the tables
    assert "| 0.300 | False | 6 |  |  | 90.0 -> 90.0 |  |" in md


def test_clean_models_alone_get_no_roc_and_no_link_to_one(tmp_path):
    rows = [_row("clean", 0.5, False, 3), _row("clean", 0.7, False, 3, seed=2)]
    assert detection.plot(rows, tmp_path / "roc.png") is None and not (tmp_path / "roc.png").exists()
    md = detection.markdown(rows, None)
    assert "ROC curves" not in md and "| neural-cleanse | 20 | 2 / 0 |" in md


def test_clean_models_have_no_asr_in_the_tables():
    rows = [_row("clean", 0.5, False, 3, defense="none"), _row("badnets", 4.0, True, 0, defense="none")]
    summary = tables.summarise(rows)
    assert summary[("small_cnn", "clean", 20, "none")]["asr"] is None
    assert summary[("small_cnn", "badnets", 20, "none")]["asr"] == (0.5, 0.0)
    assert summary[("small_cnn", "clean", 20, "none")]["clean_acc"] == (0.9, 0.0)
    assert all("clean" not in goal for goal, _, _ in tables.goals(rows))
