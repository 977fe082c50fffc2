"""The probes beside the anomaly index: a tiny square and uniform noise, and the decision they feed."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.evidence import Thresholds
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.patch_probe import PatchHit
from gradprune_mlflow.defense.probes import decide, noise_responses
from gradprune_mlflow.defense.synthesis import FamilyResult, detect
from gradprune_mlflow.defense.triggers import MaskTrigger

K = 10


def _sizes_family(name: str, sizes: list[float]) -> FamilyResult:
    s = torch.tensor([sizes])
    return FamilyResult(name, s, torch.ones_like(s, dtype=torch.bool), torch.zeros(1, K, 1, 4, 4),
                        torch.zeros(1, K, 1, 4, 4))


def _hit(target: int, response: float, fill: str = "white") -> PatchHit:
    return PatchHit(target, response, MaskTrigger(target, torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)), fill,
                    (0, 0, 3), best=response, plain=response if fill != "synthesized" else 0.1)


FLAT = [0.2, 0.21, 0.19, 0.2, 0.22, 0.18, 0.2, 0.21, 0.19, 0.2]
QUIET = [_hit(k, 0.3) for k in range(K)]


# patch 0.9, noise 0.5, anomaly index 2, relative strength 0.5; slope 4, flagged at 0.5, suspect from 0.35
THRESHOLDS = Thresholds(0.9, 0.9, 0.5, 0.5, 2.0, 0.5, 4.0, 0.5, 0.35)


def _decide(patch, blend, hits=QUIET, noise=(0.01,) * K):
    return decide(detect([patch, blend], 2.0), [patch, blend], hits, list(noise), THRESHOLDS)


def test_a_patch_anomaly_alone_does_not_flag():
    """Clean models' "bag" class stands out in the patch family (index 2.6-2.7 measured); without a probe it is not
    a backdoor."""
    found, hit = _decide(_sizes_family("patch", [0.02] + FLAT[1:]), _sizes_family("blend", FLAT))
    assert found.anomaly_index > 2.0 and found.flagged is False and found.flagged_by is None and hit is None
    assert found.target == 0 and found.family == "patch"  # the top candidate is still named, for on_clean=sanitize


def test_a_blend_anomaly_flags_only_when_its_strength_is_far_below_the_median():
    strong = _decide(_sizes_family("patch", FLAT), _sizes_family("blend", [0.07] + FLAT[1:]))[0]  # 0.35 x median
    assert (strong.flagged, strong.flagged_by, strong.target, strong.family) == (True, "anomaly_index", 0, "blend")
    # an outlier by the index, at 0.65 of the median: what clean models' "bag" looks like
    natural = _decide(_sizes_family("patch", FLAT), _sizes_family("blend", [0.13] + FLAT[1:]))[0]
    assert natural.anomaly_index > 2.0 and natural.flagged is False


def test_the_strongest_class_is_flagged_and_its_lead_detector_says_how():
    patch, blend = _sizes_family("patch", FLAT), _sizes_family("blend", FLAT)
    hits = QUIET[:3] + [_hit(3, 0.95)] + QUIET[4:]
    # a square just over its threshold on class 3, noise far over its own on class 2: class 2 is the stronger
    found, hit = _decide(patch, blend, hits, noise=[0.0, 0.0, 0.8] + [0.0] * 7)
    assert (found.flagged_by, found.target, found.family, hit) == ("noise_probe", 2, "blend", None)
    assert found.score["verdict"] == "flagged" and found.score["lead"] == "noise_probe"
    # without the noise, the square flags class 3, unlearned as the probe's square
    found, hit = _decide(patch, blend, hits)
    assert (found.flagged_by, found.target, found.family) == ("patch_probe", 3, "patch") and hit is hits[3]
    # the report carries every class's probe responses and the score with each detector's part
    report = found.to_report()
    assert report["flagged_by"] == "patch_probe" and report["probes"]["patch"][3]["best"] == 0.95
    assert [h["target"] for h in report["probes"]["patch"]] == list(range(K))
    # a white square: the way from the median class's plain response (0.3) to the threshold (0.9)
    assert report["score"]["contributions"]["patch_probe"]["strength"] == round((0.95 - 0.3) / (0.9 - 0.3), 4)


def test_a_synthesized_square_counts_by_how_far_it_stands_above_the_other_classes():
    """A square only the search's own pattern fills counts by its margin over the median class's best square (natural
    adversarial patches answer for many classes of some clean models); a white one by how far it rises from the
    median class's plain response toward patch_threshold."""
    patch, blend = _sizes_family("patch", FLAT), _sizes_family("blend", FLAT)
    margin = replace(THRESHOLDS, patch_margin=0.8)
    quiet = [_hit(k, 0.05, "synthesized") for k in range(K)]
    for fill, others, flagged, strength in (("white", QUIET, True, (0.95 - 0.3) / (0.9 - 0.3)),
                                            ("synthesized", QUIET, False, (0.95 - 0.3) / 0.8),
                                            ("synthesized", quiet, True, (0.95 - 0.05) / 0.8)):
        hits = others[:3] + [_hit(3, 0.95, fill)] + others[4:]
        found, _ = decide(detect([patch, blend], 2.0), [patch, blend], hits, [0.01] * K, margin)
        assert found.flagged is flagged and found.score["class"] == 3
        assert found.score["contributions"]["patch_probe"]["strength"] == pytest.approx(strength, abs=1e-4)
        evidence = next(e for e in found.probes["evidence"] if e["detector"] == "patch_probe")
        assert (evidence["class"], evidence["fires"], evidence["margin"]) == (3, flagged, 0.8)


def test_detectors_short_of_their_thresholds_add_up():
    """A square that sends 80% of the images (0.9 needed) and noise that sends 45% (0.5 needed) to the same class:
    neither fires alone, together they flag it."""
    patch, blend = _sizes_family("patch", FLAT), _sizes_family("blend", FLAT)
    hits = QUIET[:5] + [_hit(5, 0.8)] + QUIET[6:]
    alone, _ = _decide(patch, blend, hits)
    assert not alone.flagged
    both, hit = _decide(patch, blend, hits, noise=[0.0] * 5 + [0.45] + [0.0] * 4)
    assert both.flagged and both.target == 5 and both.score["value"] >= 0.5
    assert all(c["strength"] < 1 for c in both.score["contributions"].values())


def test_evidence_short_of_a_flag_but_above_clean_models_is_suspect():
    patch, blend = _sizes_family("patch", FLAT), _sizes_family("blend", FLAT)
    found, hit = _decide(patch, blend, QUIET[:4] + [_hit(4, 0.82)] + QUIET[5:])
    assert (found.flagged, hit, found.score["verdict"], found.score["class"]) == (False, None, "suspect", 4)
    assert 0.35 <= found.score["value"] < 0.5
    quiet, _ = _decide(patch, blend)
    assert quiet.score["verdict"] == "clean" and quiet.score["value"] < 0.35


def test_a_blend_target_is_flagged_though_another_family_holds_the_top_index():
    """The class stands out most in the patch family (where nothing flags it) and, less, in the blend family at
    0.39 of the median class's strength: the blend evidence counts for the class wherever the top index is."""
    patch = _sizes_family("patch", [0.002] + FLAT[1:])
    blend = _sizes_family("blend", [0.078] + FLAT[1:])
    assert detect([patch, blend], 2.0).family == "patch"
    found, hit = _decide(patch, blend)
    assert (found.flagged, found.flagged_by, found.target, found.family, hit) == (True, "anomaly_index", 0, "blend",
                                                                                   None)


def test_the_report_lists_every_detector_s_evidence_whichever_flagged():
    patch, blend = _sizes_family("patch", FLAT), _sizes_family("blend", [0.07] + FLAT[1:])
    hits = QUIET[:3] + [_hit(3, 0.95)] + QUIET[4:]
    found, _ = _decide(patch, blend, hits, noise=[0.0, 0.0, 0.8] + [0.0] * 7)
    ev = {e["detector"]: e for e in found.to_report()["probes"]["evidence"]}
    assert list(ev) == ["patch_probe", "noise_probe", "blend_anomaly", "patch_anomaly_index", "blend_anomaly_index"]
    assert (ev["patch_probe"]["class"], ev["patch_probe"]["score"], ev["patch_probe"]["fires"]) == (3, 0.95, True)
    assert (ev["noise_probe"]["class"], ev["noise_probe"]["fires"], ev["noise_probe"]["threshold"]) == (2, True, 0.5)
    # the blend rule holds too (0.35 of the median class's strength), though the patch probe flagged first
    assert ev["blend_anomaly"]["class"] == 0 and ev["blend_anomaly"]["score"] == 0.35 and ev["blend_anomaly"]["fires"]
    assert ev["blend_anomaly_index"]["score"] > 2 and not ev["blend_anomaly_index"]["fires"]
    quiet, _ = _decide(patch, _sizes_family("blend", [0.13] + FLAT[1:]))
    assert not any(e["fires"] for e in quiet.to_report()["probes"]["evidence"])


class _NoiseToZero(torch.nn.Module):
    """Class 0 when an image varies from pixel to pixel (noise), class 1 when it is flat: a noise backdoor."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        spread = x.flatten(1).std(1)
        return torch.stack([spread * 100, torch.full_like(spread, 1.0)] + [torch.zeros_like(spread)] * 8, 1)


def test_noise_responses_measure_where_noise_alone_sends_images():
    flat = Split(torch.full((90, 1, 8, 8), 0.5), torch.arange(90) % 9 + 1)  # no image of class 0
    responses = noise_responses(_NoiseToZero(), flat, K, seed=0)
    assert responses[0] == 1.0 and all(r == 0.0 for r in responses[1:])
    # its own generator: the global RNG is left alone
    state = torch.random.get_rng_state()
    noise_responses(_NoiseToZero(), flat, K, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_noise_sends_the_blend_models_images_to_its_target_and_not_the_badnets_models(blend_cnn, badnets_cnn,
                                                                                        clean_set):
    """The noise probe on real models: the Blend model answers to noise at class 0, the BadNets model does not."""
    data = clean_set.as_split()
    responses = {name: noise_responses(Normalized(copy.deepcopy(model), clean_set.meta.mean,
                                                  clean_set.meta.std).eval(), data, K, seed=0)
                 for name, model in (("blend", blend_cnn), ("badnets", badnets_cnn))}
    print({name: [round(r, 3) for r in rs] for name, rs in responses.items()})
    assert responses["blend"][0] > 0.9 and max(responses["blend"][1:]) < 0.5
    assert max(responses["badnets"]) < 0.5


def test_a_class_the_warp_probe_leads_is_flagged_and_unlearned_with_its_warps():
    from gradprune_mlflow.defense.warp import FlowTrigger, WarpHit

    patch, blend = _sizes_family("patch", FLAT), _sizes_family("blend", FLAT)
    flat = [FlowTrigger(k, torch.zeros(2, 4, 4)) for k in range(K)]
    warps = [WarpHit(k, 0.8 if k == 4 else 0.05, flat[k], [flat[k]]) for k in range(K)]
    found, hit = decide(detect([patch, blend], 2.0), [patch, blend], QUIET, [0.01] * K, THRESHOLDS, warps)
    assert (found.flagged_by, found.target, found.family, hit) == ("warp_probe", 4, "blend", warps[4])
    report = found.to_report()
    assert report["probes"]["warp"][4] == 0.8 and report["score"]["lead"] == "warp_probe"
    assert {"detector": "warp_probe", "class": 4, "score": 0.8, "threshold": 0.5, "fires": True} in \
        report["probes"]["evidence"]
    # without the warp probe the same evidence flags nothing, and the report has no warp entry
    quiet, _ = decide(detect([patch, blend], 2.0), [patch, blend], QUIET, [0.01] * K, THRESHOLDS)
    assert not quiet.flagged and "warp" not in quiet.to_report()["probes"]


def _search(model, clean_set, **settings):
    from gradprune_mlflow.config import SanitizeConfig
    from gradprune_mlflow.defense.probes import find_backdoor
    from gradprune_mlflow.defense.progress import SilentProgress

    net = Normalized(copy.deepcopy(model), clean_set.meta.mean, clean_set.meta.std).eval()
    cfg = SanitizeConfig(seed=0, device="cpu", synth_steps=40, synth_restarts=1, warp_steps=10).with_overrides(
        **settings)
    return find_backdoor(net, clean_set.as_split(), K, cfg, torch.Generator().manual_seed(0), SilentProgress())


def test_decisive_evidence_flags_at_half_the_steps_and_other_evidence_is_read_at_the_whole_budget(blend_cnn,
                                                                                                 clean_cnn,
                                                                                                 clean_set):
    """The Blend model's noise response is decisive at the first reading: flagged there, its class searched on.
    The clean model's is not: its evidence is the whole budget's, as a search without early flags reads it."""
    early = _search(blend_cnn, clean_set)
    assert early.detection.flagged and early.detection.target == 0 and early.detection.steps == 20
    assert early.detection.score["value"] >= 0.6 and early.detection.to_report()["search_steps"] == 20
    assert all(r.masks.shape[1] == K for r in early.results)  # every class's sizes are still there
    # the warp probe was read at half its steps too; the flagged class's warps searched on, to the whole budget's
    whole = _search(blend_cnn, clean_set, decisive_score=None)
    assert len(early.warp) == K and early.detection.probes["warp"] != [round(h.response, 4) for h in whole.warp]
    assert all(torch.equal(a.field, b.field) for a, b in zip(early.warp[0].triggers, whole.warp[0].triggers,
                                                              strict=True))
    plain, staged = _search(clean_cnn, clean_set, decisive_score=None), _search(clean_cnn, clean_set)
    assert staged.detection.steps == plain.detection.steps == 40
    assert staged.detection.score == plain.detection.score
    for a, b in zip(staged.results, plain.results, strict=True):
        assert torch.equal(a.sizes, b.sizes) and torch.equal(a.masks, b.masks)
    assert [h.response for h in staged.warp] == [h.response for h in plain.warp]


def test_decisive_score_takes_any_number_from_zero_and_refuses_the_rest():
    from gradprune_mlflow.config import SanitizeConfig
    from gradprune_mlflow.errors import BadInput

    assert SanitizeConfig().with_overrides(decisive_score=0.9).decisive_score == 0.9
    assert SanitizeConfig().with_overrides(decisive_score=2).decisive_score == 2  # no early flags
    # a flag threshold raised above it alone is no contradiction: any flag at the first reading then holds
    assert SanitizeConfig().with_overrides(flag_threshold=0.95).decisive_score == 0.6
    for bad in (-0.1, True, "high"):
        with pytest.raises(BadInput, match="decisive_score"):
            SanitizeConfig().with_overrides(decisive_score=bad)


def test_a_run_unlearns_where_flagged_and_where_the_settings_ask_for_unflagged_models():
    from gradprune_mlflow.defense.synthesis import Detection
    from gradprune_mlflow.defense.triggerfree import sanitizes

    def detection(verdict: str) -> Detection:
        return Detection(4, 1.0, verdict == "flagged", "blend", {}, score={"verdict": verdict})

    cases = {"flagged": (True, True, True), "suspect": (False, True, True), "clean": (False, False, True)}
    for verdict, wanted in cases.items():
        got = tuple(sanitizes(detection(verdict), SanitizeConfig(on_suspect=on_suspect, on_clean=on_clean))
                    for on_suspect, on_clean in (("report", "skip"), ("sanitize", "skip"), ("report", "sanitize")))
        assert got == wanted, verdict
    assert not sanitizes(Detection(4, 1.0, False, "blend", {}), SanitizeConfig(on_suspect="sanitize"))  # no score
