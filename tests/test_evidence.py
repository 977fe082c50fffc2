"""The flag score: each detector's evidence on one scale, combined into one score per class, and its verdict."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.defense.evidence import DETECTORS, Thresholds, class_scores, describe, flag_score, strengths, vote
from gradprune_mlflow.errors import BadInput
from scripts import benchmark_script

T = Thresholds(patch_threshold=0.9, patch_margin=0.9, noise_threshold=0.5, warp_threshold=0.5,
               anomaly_threshold=2.0, relative_size=0.5, flag_slope=4.0, flag_threshold=0.5, suspect_threshold=0.35)


def _evidence(patch=(0.1, 0.1, 0.1), noise=(0.0, 0.0, 0.0), index=(0.0, 0.0, 0.0), relative=(1.0, 1.0, 1.0)):
    return strengths(list(patch), list(noise), list(index), list(relative), T)


def test_a_detector_at_its_own_threshold_votes_one_half_and_the_vote_rises_with_the_evidence():
    assert vote(1.0, 4.0) == pytest.approx(0.5)
    assert vote(0.5, 4.0) < vote(0.9, 4.0) < 0.5 < vote(1.1, 4.0) < vote(2.0, 4.0)
    assert vote(0.9, 8.0) < vote(0.9, 4.0)  # a steeper slope listens less to evidence below the threshold
    # a blend anomaly index far below the median (a huge trigger) votes 0 rather than overflowing
    assert vote(-5e5, 3.0) == pytest.approx(0.0) and vote(1000.0, 3.0) == pytest.approx(1.0)


def test_strengths_put_each_detector_over_its_own_threshold():
    s = _evidence(patch=(0.9, 0.45, 0.0), noise=(0.0, 0.5, 0.25), index=(4.0, 1.0, 4.0), relative=(0.25, 0.25, 1.0))
    assert s["patch_probe"] == pytest.approx([1.0, 0.5, 0.0])
    assert s["noise_probe"] == pytest.approx([0.0, 1.0, 0.5])
    # the blend anomaly needs both: the index over 2 and the strength under half the median's; the weaker counts
    assert s["blend_anomaly"] == pytest.approx([2.0, 0.5, 0.5])


def test_a_square_counts_by_its_plain_response_or_by_how_far_it_stands_above_the_median_class():
    t = replace(T, patch_margin=0.8)
    none, ones = [0.0] * 5, [1.0] * 5
    # a model whose classes answer to synthesized squares: the median class's best square sends half of the images
    # class 0: a white square works on 90%; class 1: only the search's pattern works, on all of them
    s = strengths([0.9, 1.0, 0.5, 0.5, 0.4], none, none, ones, t, plain=[0.9, 0.2, 0.1, 0.1, 0.1])["patch_probe"]
    assert s == pytest.approx([1.0, 0.5 / 0.8, 0.0, 0.0, 0.0])
    assert flag_score({"patch_probe": s}, t).best.target == 0
    # where no other class answers, the same synthesized square stands out and fires on its own
    s = strengths([1.0, 0.1, 0.1, 0.1, 0.0], none, none, ones, t, plain=[0.2, 0.1, 0.1, 0.1, 0.0])["patch_probe"]
    assert s[0] == pytest.approx(0.9 / 0.8) and flag_score({"patch_probe": s}, t).verdict == "flagged"
    # where no class answers to a plain square, its response over the threshold
    s = strengths([0.9, 0.6, 0.6], none[:3], none[:3], ones[:3], t, plain=[0.9, 0.0, 0.0])["patch_probe"]
    assert s == pytest.approx([1.0, 0.0, 0.0])
    # where every class answers a little (the scan's best squares on some clean models), the part of the way from
    # the median class's response to the threshold: 0.7 is not a backdoor's stamp, 1.0 is
    plain = [0.7, 1.0, 0.4, 0.4, 0.3]
    s = strengths(plain, none, none, ones, t, plain=plain)["patch_probe"]
    assert s[:2] == pytest.approx([0.3 / 0.5, 0.6 / 0.5]) and flag_score({"patch_probe": s}, t).best.target == 1
    # a median class at the threshold leaves the plain response no say; the margin still counts
    s = strengths([0.95, 0.9, 0.9], none[:3], none[:3], ones[:3], t, plain=[0.95, 0.9, 0.9])["patch_probe"]
    assert s == pytest.approx([0.05 / 0.8, 0.0, 0.0])
    # without the plain responses every square counts as plain (lines written before the probe kept them)
    assert strengths([0.9, 1.0, 0.6], none[:3], none[:3], ones[:3], t)["patch_probe"] == pytest.approx(
        [1.0, 1.0 / 0.9, 0.6 / 0.9])


def test_one_detector_at_its_threshold_flags_as_it_did_alone():
    for k, detector in enumerate(DETECTORS):
        evidence = {d: [0.0] * len(DETECTORS) for d in DETECTORS}
        evidence[detector][k] = 1.0
        score = flag_score(evidence, T)
        assert (score.verdict, score.best.target, score.best.lead) == ("flagged", k, detector)


def test_the_score_combines_votes_as_a_noisy_or_and_the_best_class_wins():
    evidence = {"patch_probe": [0.9, 0.0], "noise_probe": [0.9, 0.0], "blend_anomaly": [0.0, 0.95]}
    scores = class_scores(evidence, 4.0)
    p, n, b = (vote(s, 4.0) for s in (0.9, 0.9, 0.0))
    assert scores[0].score == pytest.approx(1 - (1 - p) * (1 - n) * (1 - b))
    assert scores[0].score > scores[1].score  # two detectors at 0.9 beat one at 0.95
    assert flag_score(evidence, T).best.target == 0


def test_the_noise_and_warp_probes_share_one_vote():
    """Two probes of one question: the class gets the larger of their votes, so a warp probe that finds nothing
    leaves every class's score where the noise probe and the others put it."""
    base = {"patch_probe": [0.3, 0.2], "noise_probe": [0.4, 0.1], "blend_anomaly": [0.5, 0.0]}
    without = class_scores(base, 4.0)
    quiet = class_scores({**base, "warp_probe": [0.2, 0.05]}, 4.0)
    assert [c.score for c in quiet] == pytest.approx([c.score for c in without])
    loud = class_scores({**base, "warp_probe": [1.2, 0.05]}, 4.0)[0]
    p, w, b = (vote(s, 4.0) for s in (0.3, 1.2, 0.5))
    assert loud.score == pytest.approx(1 - (1 - p) * (1 - w) * (1 - b)) and loud.lead == "warp_probe"
    # a probe that did not run is absent from the report, not a zero
    assert "warp_probe" not in flag_score(base, T).to_report()["contributions"]


def test_verdicts_and_report():
    evidence = {"patch_probe": [0.7, 0.1], "noise_probe": [0.7, 0.0], "blend_anomaly": [0.0, 0.0]}
    score = flag_score(evidence, T)
    assert score.verdict == "suspect"
    report = score.to_report()
    assert report["verdict"] == "suspect" and report["class"] == 0 and report["threshold"] == 0.5
    assert set(report["contributions"]) == set(evidence)  # the detectors that ran
    assert report["contributions"]["patch_probe"] == {"strength": 0.7, "vote": round(vote(0.7, 4.0), 4)}
    line = describe(report)
    assert line.startswith(f"flag score {report['value']:.2f} for class 0") and "patch probe 0.70" in line
    quiet = flag_score({d: [0.0, 0.0] for d in DETECTORS}, T)
    assert quiet.verdict == "clean" and quiet.best.target == 0


def test_the_configuration_gives_the_thresholds_and_refuses_bad_ones():
    t = Thresholds.of(SanitizeConfig())
    assert t.flag_threshold == SanitizeConfig.flag_threshold and t.suspect_threshold <= t.flag_threshold
    for bad in ({"flag_slope": 0}, {"suspect_threshold": 0.6}, {"flag_threshold": 1.0}, {"suspect_threshold": 0.0}):
        with pytest.raises(BadInput):
            SanitizeConfig().with_overrides(**bad)


def _script():
    return benchmark_script("detection_evidence")


def _line(attack, target, patch=0.1, noise=0.0, index=0.0, relative=1.0, k=3, at=0):
    c = {"patch_probe": [0.1] * k, "noise_probe": [0.0] * k, "blend_index": [0.0] * k, "blend_relative": [1.0] * k}
    c["patch_probe"][at], c["noise_probe"][at], c["blend_index"][at], c["blend_relative"][at] = (patch, noise, index,
                                                                                                  relative)
    return {"preset": "p", "split": "dev", "arch": "small_cnn", "attack": attack, "seed": 0, "per_class": 50,
            "target": target, "flagged": False, "flagged_target": None, "flagged_by": None, "classes": c}


def test_the_evidence_script_scores_saved_evidence_without_detecting_again(tmp_path):
    script = _script()
    rows = [_line("clean", None), _line("clean", None, patch=0.75, at=1),  # a clean model short of a flag
            _line("badnets", 0, patch=0.99), _line("signal", 0, noise=0.45, index=3.0, relative=0.6),
            _line("wanet", 0, patch=0.8, at=2)]  # flagged at the wrong class it would be, were it flagged
    s = script.summary(rows, T)
    assert (s["clean"], s["backdoored"], s["clean_flagged"], s["right_target"], s["single_target"]) == (2, 3, 0, 2, 3)
    assert s["clean_max"] == pytest.approx(script.scored(rows[1], T).best.score) and s["clean_suspect"] == 1
    assert 0.5 < s["auroc"] <= 1.0
    source = tmp_path / "evidence.jsonl"
    source.write_text("\n".join(map(__import__("json").dumps, rows)))
    md = tmp_path / "flag-score.md"
    assert script.main(["--score", str(source), "--slope", "4", "8", "--calibrate", "--md", str(md)]) == 0
    text = md.read_text()
    assert "| 4.0 |" in text and "| 8.0 |" in text and "| small_cnn | signal | 0 | 0 |" in text
    assert md.with_suffix(".png").stat().st_size > 5_000
    # calibrated: the suspect threshold just above the clean models' highest score, so no clean model is suspect
    t = script.calibrated(rows, 4.0, SanitizeConfig())
    assert s["clean_max"] < t.suspect_threshold <= s["clean_max"] + script.SUSPECT_STEP
    assert script.summary(rows, t)["clean_suspect"] == 0
    assert script.choose(rows, [4.0, 8.0], SanitizeConfig()).flag_slope in (4.0, 8.0)


def test_the_evidence_script_compares_margins_for_the_patch_probe(tmp_path):
    script = _script()
    natural = _line("clean", None, patch=1.0, at=1)  # a clean model whose every class answers to the search's squares
    natural["classes"]["patch_probe"] = [0.8, 1.0, 0.8]
    natural["classes"]["patch_plain"] = [0.1, 0.2, 0.1]
    stamp = _line("badnets", 0, patch=0.99)
    stamp["classes"]["patch_plain"] = [0.99, 0.1, 0.1]
    rows = [natural, stamp]
    for margin, clean_flagged in ((0.1, 1), (0.8, 0)):
        s = script.summary(rows, replace(T, patch_margin=margin))
        assert (s["clean_flagged"], s["right_target"]) == (clean_flagged, 1)
    source = tmp_path / "evidence.jsonl"
    source.write_text("\n".join(map(__import__("json").dumps, rows)))
    md = tmp_path / "flag-score.md"
    assert script.main(["--score", str(source), "--margin", "0.1", "0.8", "--md", str(md)]) == 0
    assert "| 3.0 | 0.1 |" in md.read_text() and "| 3.0 | 0.8 |" in md.read_text()


def test_the_evidence_script_joins_the_plain_scan_to_lines_collected_without_it(tmp_path, monkeypatch, badnets_cnn,
                                                                                clean_set):
    """--rescan: the scan's white corner square on a BadNets model raises its target's plain response; the decision
    recorded without the scan is dropped, and lines already rescanned are kept."""
    script = _script()
    monkeypatch.setattr(script, "model_for", lambda *a, **k: (badnets_cnn, None))
    monkeypatch.setattr(script.lab, "trusted_set", lambda *a, **k: clean_set)
    line = _line("badnets", 0, k=10)
    line.update(preset="zoo-cpu-quick", train_images=6000, train_epochs=2, flagged=True, flagged_by="patch_probe")
    line["classes"].update(patch_plain=[0.0] * 10, patch_fill=["synthesized"] * 10)
    source, out = tmp_path / "evidence.jsonl", tmp_path / "rescanned.jsonl"
    source.write_text(__import__("json").dumps(line) + "\n")
    script.main(["--rescan", str(source), "--out", str(out)])
    row = __import__("json").loads(out.read_text())
    assert row["classes"]["patch_plain"][0] >= 0.9 and row["classes"]["patch_probe"][0] >= 0.9
    assert row["classes"]["patch_fill"][0] in ("white", "black") and row["flagged"] is None and row["scan_seconds"] > 0
    assert script.scored(row, T).best.target == 0
    assert row["model"] == script.model_digest(badnets_cnn) and row["same_model"] is None  # the line had no digest
    script.main(["--rescan", str(source), "--out", str(out)])
    assert len(out.read_text().splitlines()) == 1
    # a line collected on another model is not joined with this one's scan
    line["model"], again = "0" * 16, tmp_path / "again.jsonl"
    source.write_text(__import__("json").dumps(line) + "\n")
    script.main(["--rescan", str(source), "--out", str(again)])
    assert not again.exists()
