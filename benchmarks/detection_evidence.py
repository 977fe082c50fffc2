"""Every detector's raw evidence for every class of the zoo's models: what the flag score is calibrated on.

For each model of a preset's split, runs trigger-free detection exactly as `sanitize` does (same split of the trusted
set, same generator, the default configuration) and writes one JSON line per model: for every class, the patch
probe's best response, the noise probe's response, and each family's anomaly index and trigger size relative to the
median class's. Nothing is decided here, so the lines serve any scoring rule: `--score` prints the flag score of each
model with the configuration's rule (defense/evidence.py).

    python benchmarks/detection_evidence.py --preset zoo-cpu --archs small_cnn --per-class 50 --split dev
    python benchmarks/detection_evidence.py --preset zoo-cpu-quick --split test
    python benchmarks/detection_evidence.py --score benchmarks/results/detection-evidence-dev.jsonl \
        --slope 2 3 4 6 8 --calibrate --md benchmarks/results/flag-score-dev.md
    python benchmarks/detection_evidence.py --rescan IN.jsonl --out OUT.jsonl

`--rescan` adds the patch probe's plain scan to lines collected without it: the scan reads only the model and the
trusted training split, none of the synthesis, so on the model a line was collected on its squares join the line's
own as the probe now joins them.

Resumable: models already in the output file are skipped.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from gradprune_mlflow import lab
from gradprune_mlflow.benchmark.detection import auroc
from gradprune_mlflow.benchmark.presets import CLEAN, PRESETS, parse_options
from gradprune_mlflow.benchmark.runner import measure, model_for
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.defense.evidence import Thresholds, flag_score, strengths
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.patch_probe import other_images, plain_scan, probe_sides
from gradprune_mlflow.defense.probes import find_backdoor, relative_size
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.searchnet import search_copy
from gradprune_mlflow.defense.synthesis import anomaly_index
from gradprune_mlflow.lab.attacks import AllToAllTrigger

HERE = Path(__file__).resolve().parent


def class_evidence(model, clean, seed: int, options: dict | None = None) -> dict:
    """Per-class raw evidence of one model, detected as `sanitize` detects with the default configuration (changed by
    `options`, SanitizeConfig field -> value)."""
    cfg = SanitizeConfig(seed=seed, device="cpu").with_overrides(**(options or {}))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, _ = clean.split(cfg.val_fraction, cfg.seed)
    net = Normalized(copy.deepcopy(model).float().cpu().eval(), clean.meta.mean, clean.meta.std)
    k = clean.meta.num_classes
    start = time.perf_counter()
    detection, results, _, noise, _ = find_backdoor(net, train, k, cfg, gen, SilentProgress())
    seconds = round(time.perf_counter() - start, 1)
    by_family = {r.family: r for r in results}
    hits = detection.probes["patch"]
    hits = sorted(hits, key=lambda h: h["target"])
    out = {"patch_probe": [h["best"] for h in hits], "noise_probe": noise,
           "patch_plain": [h["plain"] for h in hits], "patch_fill": [h["fill"] for h in hits]}
    if "warp" in detection.probes:
        out["warp_probe"] = detection.probes["warp"]
    for family, res in by_family.items():
        idx = anomaly_index(res.class_sizes())
        out[f"{family}_index"] = [round(float(idx[res.column(c)]), 4) for c in range(k)]
        out[f"{family}_relative"] = [round(relative_size(res, c), 4) for c in range(k)]
    return {"flagged": detection.flagged, "flagged_target": detection.target if detection.flagged else None,
            "flagged_by": detection.flagged_by, "detection_seconds": seconds, "search_steps": detection.steps,
            "classes": out}


def _target(attack: str, trigger) -> int | None:
    """The backdoor's one target class; None for clean and all-to-all models."""
    return None if attack == CLEAN or isinstance(trigger, AllToAllTrigger) else trigger.target


def single_target(row: dict) -> int | None:
    """A line's one target class (lines written before all-to-all lines said None gave the base trigger's)."""
    return None if "all-to-all" in row["attack"] else row["target"]


def _asr(attack: str, model, trigger, clean, preset) -> float | None:
    """The real trigger's success rate on the preset's test images (None for a clean model): is the attack learned?"""
    if attack == CLEAN:
        return None
    test = lab.test_data(preset.test_images, preset.image)
    return round(measure(model, clean, trigger, test, torch.device("cpu"))["attack_success_rate"], 4)


def fill_asr(path: Path) -> None:
    """Add the attack success rate to the lines of `path` written without one (models from the cache)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if "asr" not in row:
            preset = PRESETS[row["preset"]]
            model, trigger = model_for(row["attack"], row["arch"], preset, row["seed"], HERE / "cache",
                                       torch.device("cpu"))
            clean = lab.trusted_set(row["per_class"], seed=row["seed"], image=preset.image)
            row["asr"] = _asr(row["attack"], model, trigger, clean, preset)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def model_digest(model) -> str:
    """A short hash of the model's weights: which model a line's evidence was collected on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def rescan(src: Path, out: Path) -> None:
    """Write `src`'s lines to `out` with the plain scan's squares joined to the patch probe's evidence (models from
    the cache, trained where missing); lines already in `out` are kept. The join is exact only on the model the
    line was collected on: a line whose recorded `model` differs from the cache's is skipped, and a line without one
    (collected before lines recorded it) is joined with `same_model` null, since CPU training is not bit-identical
    across machines and thread counts."""
    done = {(r["arch"], r["attack"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())} \
        if out.is_file() else set()
    for row in map(json.loads, src.read_text().splitlines()):
        if (row["arch"], row["attack"], row["seed"]) in done:
            continue
        start = time.perf_counter()
        preset = PRESETS[row["preset"]].with_overrides(n_train=row["train_images"], epochs=row["train_epochs"])
        model, _ = model_for(row["attack"], row["arch"], preset, row["seed"], HERE / "cache", torch.device("cpu"))
        digest = model_digest(model)
        if row.get("model", digest) != digest:
            print(f"{row['arch']} {row['attack']} s{row['seed']}: skipped, the cached model is not the one the line "
                  "was collected on", flush=True)
            continue
        row["same_model"] = True if "model" in row else None
        row["model"] = digest
        clean = lab.trusted_set(row["per_class"], seed=row["seed"], image=preset.image)
        cfg = SanitizeConfig(seed=row["seed"], device="cpu")
        train, _ = clean.split(cfg.val_fraction, cfg.seed)
        net = Normalized(copy.deepcopy(model).float().cpu().eval(), clean.meta.mean, clean.meta.std)
        net = search_copy(net, train.images[:8], cfg.search_precision)
        k = clean.meta.num_classes
        scan_start = time.perf_counter()
        hits = plain_scan(net, train, probe_sides(train.images.shape), other_images(train, list(range(k))))
        c = row["classes"]
        for cls, hit in hits.items():
            c["patch_plain"][cls] = max(c["patch_plain"][cls], round(hit.response, 4))
            if hit.response > c["patch_probe"][cls]:
                c["patch_probe"][cls], c["patch_fill"][cls] = round(hit.response, 4), hit.fill
        # the decision recorded at collection was made without the scan: only the score says what it is now
        row.update(flagged=None, flagged_target=None, flagged_by=None,
                   scan_seconds=round(time.perf_counter() - scan_start, 1))
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{row['arch']} {row['attack']} s{row['seed']}: plain scan {row['scan_seconds']} s "
              f"(model {round(scan_start - start, 1)} s)", flush=True)


def collect(args) -> None:
    seeds = {"dev_seeds" if args.split == "dev" else "test_seeds": args.seeds}
    preset = PRESETS[args.preset].with_overrides(archs=args.archs, attacks=args.attacks, per_class=args.per_class,
                                                 n_train=args.train_images, epochs=args.train_epochs,
                                                 test_images=args.test_images, **seeds)
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {(r["arch"], r["attack"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())}
    cache = HERE / "cache"
    n = preset.per_class[0]
    options = parse_options([f"sanitize.{o}" for o in args.option]).get("sanitize", {})
    for arch in preset.archs:
        for attack in preset.attacks:
            for seed in preset.seeds(args.split):
                if (arch, attack, seed) in done:
                    continue
                start = time.perf_counter()
                model, trigger = model_for(attack, arch, preset, seed, cache, torch.device("cpu"))
                clean = lab.trusted_set(n, seed=seed, image=preset.image)
                row = {"preset": preset.name, "split": args.split, "arch": arch, "attack": attack, "seed": seed,
                       "model": model_digest(model),
                       "per_class": n, "train_images": preset.n_train, "train_epochs": preset.epochs,
                       **({"options": options} if options else {}),
                       "target": _target(attack, trigger),
                       "asr": _asr(attack, model, trigger, clean, preset),
                       **class_evidence(model, clean, seed, options), "seconds": round(time.perf_counter() - start, 1)}
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{arch} {attack} s{seed}: flagged={row['flagged']} by={row['flagged_by']} "
                      f"target={row['flagged_target']} ({row['seconds']} s)", flush=True)


def scored(row: dict, t: Thresholds):
    """The flag score of one model's line under thresholds `t`."""
    c = row["classes"]
    # lines collected before the warp probe existed have no "warp_probe": scored without it
    # lines collected before the probe kept its best plain square have no "patch_plain": every square counts as plain
    return flag_score(strengths(c["patch_probe"], c["noise_probe"], c["blend_index"], c["blend_relative"], t,
                                c.get("warp_probe"), c.get("patch_plain")), t)


def summary(rows: list[dict], t: Thresholds) -> dict:
    """Over a split's models: the clean models' highest score, how many clean models are flagged or suspect, how many
    backdoored ones are flagged at the right target or suspect, and the score's AUROC (clean vs backdoored)."""
    clean = [scored(r, t) for r in rows if r["attack"] == CLEAN]
    bad = [(r, scored(r, t)) for r in rows if r["attack"] != CLEAN]
    single = [(r, s) for r, s in bad if single_target(r) is not None]
    return {"clean": len(clean), "backdoored": len(bad),
            "clean_max": max((s.best.score for s in clean), default=float("nan")),
            "clean_flagged": sum(s.verdict == "flagged" for s in clean),
            "clean_suspect": sum(s.verdict == "suspect" for s in clean),
            "right_target": sum(s.verdict == "flagged" and s.best.target == r["target"] for r, s in single),
            "single_target": len(single),
            "backdoored_suspect": sum(s.verdict == "suspect" for _, s in bad),
            "backdoored_flagged": sum(s.verdict == "flagged" for _, s in bad),
            "auroc": auroc([s.best.score for s in clean], [s.best.score for _, s in bad])}


def _first_rule(row: dict) -> str:
    if row["flagged"] is None:
        return "(rescanned: none)"
    return f"class {row['flagged_target']} by {row['flagged_by']}" if row["flagged"] else "not flagged"


# The suspect threshold is set at the next multiple of this above the development clean models' highest score.
SUSPECT_STEP = 0.05


def calibrated(rows: list[dict], slope: float, cfg: SanitizeConfig) -> Thresholds:
    """The configuration's thresholds with `slope`, and the suspect threshold just above the highest score of the
    clean models in `rows` (the next multiple of SUSPECT_STEP, at most the flag threshold)."""
    t = Thresholds.of(cfg.with_overrides(flag_slope=slope))
    top = max(scored(r, t).best.score for r in rows if r["attack"] == CLEAN)
    return replace(t, suspect_threshold=round(min((math.floor(top / SUSPECT_STEP) + 1) * SUSPECT_STEP,
                                                  t.flag_threshold), 2))


def choose(rows: list[dict], slopes: list[float], cfg: SanitizeConfig) -> Thresholds:
    """The calibrated thresholds of the slope that flags no clean model of `rows` and the most single-target
    backdoored ones at the right target, then leaves the fewest of those neither flagged nor suspect, then keeps the
    clean models farthest below the flag threshold. All-to-all models take no part: the zoo's CPU presets do not
    teach them their backdoor."""
    return max((calibrated(rows, slope, cfg) for slope in slopes), key=merit(rows))


def merit(rows: list[dict]):
    """choose's order of thresholds on `rows`, as a sort key."""
    single = [r for r in rows if r["attack"] == CLEAN or single_target(r) is not None]

    def key(t: Thresholds):
        s = summary(single, t)
        return (s["clean_flagged"] == 0, s["right_target"], s["backdoored_suspect"] + s["backdoored_flagged"],
                t.flag_threshold - s["clean_max"])

    return key


def score_table(rows: list[dict], t: Thresholds) -> str:
    """Markdown: every model's flag score, verdict, class and lead detector under thresholds `t`."""
    lines = ["| arch | attack | seed | target | ASR % | score | verdict | class | lead | patch | noise | blend | "
             "decision recorded with the evidence |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["attack"] != CLEAN, r["arch"], r["attack"], r["seed"])):
        s = scored(r, t)
        st = s.best.strengths
        target = single_target(r)
        asr = "-" if r.get("asr") is None else f"{100 * r['asr']:.1f}"
        lines.append(f"| {r['arch']} | {r['attack']} | {r['seed']} | {'-' if target is None else target} | {asr} "
                     f"| {s.best.score:.3f} | {s.verdict} | {s.best.target} | {s.best.lead} | "
                     f"{st['patch_probe']:.2f} | {st['noise_probe']:.2f} | {st['blend_anomaly']:.2f} | "
                     f"{_first_rule(r)} |")
    return "\n".join(lines)


def plot(rows: list[dict], t: Thresholds, path: Path) -> Path:
    """Every model's flag score on one axis, clean and each attack on its own line, with both thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["attack"] for r in rows}, key=lambda a: (a != CLEAN, a))
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(groups) + 1.2))
    for y, attack in enumerate(groups):
        scores = [scored(r, t).best.score for r in rows if r["attack"] == attack]
        ax.scatter(scores, [y] * len(scores), s=22, color="tab:green" if attack == CLEAN else "tab:red", alpha=0.7)
    ax.axvline(t.suspect_threshold, color="orange", ls="--", label=f"suspect from {t.suspect_threshold}")
    ax.axvline(t.flag_threshold, color="black", ls="-", label=f"flagged at {t.flag_threshold}")
    ax.set(yticks=range(len(groups)), yticklabels=groups, xlim=(0, 1), xlabel="flag score (best class)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict], candidates: list[Thresholds], chosen: Thresholds, command: str, md: Path) -> None:
    """The summary for each candidate's thresholds, every model's score under `chosen` and its plot, under a header
    that says the command, the date, the commit and which split the models are of."""
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    splits = " and ".join(sorted({r["split"] for r in rows}))
    lines = [f"# Flag score on the {splits} models", "",
             f"`{command}`, written {date.today()} at commit {commit}; evidence from "
             f"{', '.join(sorted({r['preset'] for r in rows}))}, {rows[0]['per_class']} trusted images per class; "
             f"flag_threshold {chosen.flag_threshold}.", "",
             "| flag_slope | patch_margin | suspect_threshold | clean models: highest score | "
             "clean flagged | clean suspect | right target (single target) | backdoored flagged | backdoored suspect "
             "| AUROC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in candidates:
        s = summary(rows, t)
        lines.append(f"| {t.flag_slope} | {t.patch_margin} | {t.suspect_threshold} | "
                     f"{s['clean_max']:.3f} | "
                     f"{s['clean_flagged']}/{s['clean']} | {s['clean_suspect']}/{s['clean']} | "
                     f"{s['right_target']}/{s['single_target']} | {s['backdoored_flagged']}/{s['backdoored']} | "
                     f"{s['backdoored_suspect']}/{s['backdoored']} | {s['auroc']:.3f} |")
    png = plot(rows, chosen, md.with_suffix(".png"))
    lines += ["", f"Every model at flag_slope {chosen.flag_slope}, suspect_threshold {chosen.suspect_threshold} "
              f"([{png.name}]({png.name})); strengths are each detector's evidence over its own threshold for the "
              "best class:", "", score_table(rows, chosen), ""]
    md.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="zoo-cpu-quick", choices=sorted(PRESETS))
    p.add_argument("--split", default="dev", choices=("dev", "test"))
    p.add_argument("--archs", nargs="+")
    p.add_argument("--attacks", nargs="+")
    p.add_argument("--per-class", type=int, nargs=1)
    p.add_argument("--seeds", type=int, nargs="+", help="instead of the preset's seeds of the split")
    p.add_argument("--train-images", type=int, help="attacker's training images (default: the preset's)")
    p.add_argument("--train-epochs", type=int, help="attacker's training epochs (default: the preset's)")
    p.add_argument("--test-images", type=int, help="measure the ASR on the first N test images (default: the preset's)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a configuration field for the detection, e.g. synth_steps=100 (repeatable; recorded per line)")
    p.add_argument("--out", help="JSON lines to append to (default benchmarks/results/detection-evidence-SPLIT.jsonl)")
    p.add_argument("--score", metavar="JSONL", help="score the models of this file (no detection runs)")
    p.add_argument("--rescan", metavar="JSONL", help="join the plain scan to this file's lines (written to --out)")
    p.add_argument("--fill-asr", metavar="JSONL", help="add the real trigger's success rate to lines without one")
    p.add_argument("--slope", type=float, nargs="+", help="with --score: flag_slope values to compare")
    p.add_argument("--margin", type=float, nargs="+", metavar="M",
                   help="with --score: patch_margin values to compare (each with each slope)")
    p.add_argument("--calibrate", action="store_true",
                   help="with --score: set each slope's suspect threshold just above the clean models' highest score "
                        "and choose a slope (development lines only)")
    p.add_argument("--md", help="with --score: write the tables to this markdown file (and its plot beside it)")
    args = p.parse_args(argv)
    if args.fill_asr:
        fill_asr(Path(args.fill_asr))
        return 0
    if args.rescan:
        if not args.out:
            p.error("--rescan needs --out")
        rescan(Path(args.rescan), Path(args.out))
        return 0
    if args.score:
        rows = [json.loads(line) for line in Path(args.score).read_text().splitlines()]
        cfg = SanitizeConfig()
        slopes = args.slope or [cfg.flag_slope]
        configs = [cfg.with_overrides(patch_margin=y)
                   for y in args.margin or [cfg.patch_margin]]
        if args.calibrate:
            candidates = [calibrated(rows, x, c) for c in configs for x in slopes]
            chosen = max((choose(rows, slopes, c) for c in configs), key=merit(rows))
        else:
            candidates = [Thresholds.of(c.with_overrides(flag_slope=x)) for c in configs for x in slopes]
            chosen = Thresholds.of(cfg)
        for t in candidates:
            print(f"flag_slope {t.flag_slope}, patch_margin {t.patch_margin}, "
                  f"suspect_threshold {t.suspect_threshold}: {json.dumps(summary(rows, t))}")
        print(f"chosen: flag_slope {chosen.flag_slope}, suspect_threshold {chosen.suspect_threshold}")
        print(score_table(rows, chosen))
        if args.md:
            command = "python benchmarks/detection_evidence.py " + " ".join(argv if argv is not None else sys.argv[1:])
            write_report(rows, candidates, chosen, command, Path(args.md))
        return 0
    args.out = args.out or str(HERE / "results" / f"detection-evidence-{args.split}.jsonl")
    collect(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
