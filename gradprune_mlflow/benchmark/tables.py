"""From benchmark rows to what people read: a markdown table (mean ± std over seeds), the goal checks and a plot."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from gradprune_mlflow.benchmark.presets import CLEAN

METRICS = ("clean_acc", "asr", "ra", "seconds", "backward_passes")
NO_MEANING_ON_CLEAN = ("asr", "ra", "asr_before")  # measured with some trigger on clean models: left out


def _num(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summarise(rows: list[dict[str, str]]) -> dict[tuple, dict]:
    """(arch, attack, per_class, defense) -> {metric: (mean, std)}, 'drop' (points vs no defense), 'worst_drop' (the
    largest one model's), 'n', 'errors'."""
    groups: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[(r["arch"], r["attack"], int(r["per_class"]), r["defense"])].append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        cell: dict = {"n": len(ok), "errors": sorted({r["error"] for r in rs if r.get("error")}),
                      "flagged": sum(r.get("flagged") == "True" for r in ok)}
        for m in METRICS + ("acc_before", "asr_before"):
            vals = [v for v in (_num(r.get(m)) for r in ok) if v is not None and not
                    (key[1] == CLEAN and m in NO_MEANING_ON_CLEAN)]
            cell[m] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None
        scoring = [json.loads(r.get("info") or "{}").get("scoring_passes") for r in ok]
        scoring = [v for v in scoring if isinstance(v, int | float)]
        cell["scoring_passes"] = (statistics.fmean(scoring), 0.0) if scoring else None
        drops = [100 * (float(r["acc_before"]) - float(r["clean_acc"])) for r in ok]
        cell["drop"] = (statistics.fmean(drops), statistics.stdev(drops) if len(drops) > 1 else 0.0) if drops else None
        cell["worst_drop"] = max(drops) if drops else None
        out[key] = cell
    return out


def _pm(pair, scale: float = 100.0, digits: int = 1) -> str:
    if pair is None:
        return "n/a"
    mean, std = pair
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown(rows: list[dict[str, str]], defenses: list[str]) -> str:
    """One table per (arch, attack, clean budget): a row per defense, percentages, mean ± std over seeds."""
    summary = summarise(rows)
    blocks = sorted({k[:3] for k in summary})
    lines = []
    for arch, attack, per_class in blocks:
        lines += [f"### {arch}, {attack}, {per_class} clean images per class", "",
                  "| defense | clean acc % | drop (pts) | ASR % | RA % | seconds | backward passes | flagged | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in defenses:
            c = summary.get((arch, attack, per_class, d))
            if c is None:
                continue
            if c["n"] == 0:
                lines.append(f"| {d} | failed: {'; '.join(c['errors'])[:120]} | | | | | | | 0 |")
                continue
            flagged = f"{c['flagged']}/{c['n']}" if d in FLAGGING else ""
            lines.append(f"| {d} | {_pm(c['clean_acc'])} | {_pm(c['drop'], 1.0, 2)} | {_pm(c['asr'])} | "
                         f"{_pm(c['ra'])} | {_pm(c['seconds'], 1.0)} | {_pm(c['backward_passes'], 1.0, 0)} | "
                         f"{flagged} | {c['n']} |")
        lines.append("")
    return "\n".join(lines)


def _asr_before(summary: dict, model: tuple, defenses: list[str]):
    """A model's ASR before (mean, std): every row of the model carries it; "none"'s row first, else any defense's."""
    for d in ("none", *defenses):
        cell = summary.get((*model, d))
        if cell is not None and cell.get("asr_before") is not None:
            return cell["asr_before"]
    return None


def overview(rows: list[dict[str, str]], defenses: list[str]) -> str:
    """Every defense against every attack at a glance, per (arch, clean budget): "drop / ASR after" (clean-accuracy
    points, ASR %; mean over seeds), the drop alone for clean models, and the ASR before in the first line."""
    summary = summarise(rows)
    lines = []
    for arch, per_class in sorted({(k[0], k[2]) for k in summary}):
        attacks = sorted({k[1] for k in summary if (k[0], k[2]) == (arch, per_class)}, key=lambda a: (a != CLEAN, a))
        lines += [f"**{arch}, {per_class} clean images per class**: drop (pts) / ASR % after", "",
                  "| defense | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
        before = [_asr_before(summary, (arch, a, per_class), defenses) for a in attacks]
        lines.append("| *ASR before* | " + " | ".join("" if b is None else f"{100 * b[0]:.1f}" for b in before) + " |")
        for d in defenses:
            cells = []
            for a in attacks:
                c = summary.get((arch, a, per_class, d))
                if c is None or not c["n"]:
                    cells.append("" if c is None else "failed")
                    continue
                drop = f"{c['drop'][0]:.2f}"
                cells.append(drop if c["asr"] is None else f"{drop} / {100 * c['asr'][0]:.1f}")
            if any(cells):
                lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# Defenses whose report says whether their detector flagged a class.
FLAGGING = {"neural-cleanse", "grad-prune-free", "grad-prune-detect", "unlearn-ft-free", "prune-only-free"}
BASELINES = ("fine-tuning", "ft-sam", "fine-pruning", "anp", "neural-cleanse")
# Trigger-free Grad-Prune as the product runs it (clean models left alone) and sanitizing every model.
TRIGGER_FREE = ("grad-prune-detect", "grad-prune-free")
# The ASR goal (%) of each defense the goals are checked on; every one of them also has the 2-point drop goal.
ASR_GOALS = {**dict.fromkeys(TRIGGER_FREE, 5.0), "grad-prune-fast": 2.0}
# The most a clean model sanitized anyway (grad-prune-free, on_clean=sanitize) may lose, in points, on every model.
ON_CLEAN_DROP = 0.5


def goals(rows: list[dict[str, str]]) -> list[tuple[str, bool | None, str]]:
    """The goals, each checked on the largest clean budget (the clean-model goal on every budget): (goal, met or None
    if not measured, evidence)."""
    summary = summarise(rows)
    out = []
    for (arch, attack, n, d), c in sorted(summary.items()):
        if attack != CLEAN or d != "grad-prune-free" or not c["n"]:
            continue
        out.append((f"grad-prune-free on a clean model: drop <= {ON_CLEAN_DROP:g} pts on every model "
                    f"({arch}/{n} per class)", c["worst_drop"] <= ON_CLEAN_DROP,
                    f"mean {c['drop'][0]:.2f}, worst {c['worst_drop']:.2f} pts over {c['n']} models"))
    for arch, attack in sorted({k[:2] for k in summary if k[1] != CLEAN}):
        n = max(k[2] for k in summary if k[:2] == (arch, attack))

        def cell(d, arch=arch, attack=attack, n=n):
            c = summary.get((arch, attack, n, d))
            return c if c and c["n"] else None

        where = f"{arch}/{attack}/{n} per class"
        for d, limit in ASR_GOALS.items():
            c = cell(d)
            if c:
                asr, drop = 100 * c["asr"][0], c["drop"][0]
                out.append((f"{d} ASR <= {limit:g}% and drop <= 2 pts ({where})", asr <= limit and drop <= 2.0,
                            f"ASR {asr:.1f}%, drop {drop:.2f} pts"))
        for d in TRIGGER_FREE:
            ours = cell(d)
            for b in BASELINES if ours else ():
                c = cell(b)
                if c:
                    beats = ours["asr"][0] <= c["asr"][0] and ours["clean_acc"][0] >= c["clean_acc"][0]
                    out.append((f"{d} beats {b} on ASR and accuracy together ({where})", beats,
                                f"ASR {100 * ours['asr'][0]:.1f} vs {100 * c['asr'][0]:.1f}%, acc "
                                f"{100 * ours['clean_acc'][0]:.1f} vs {100 * c['clean_acc'][0]:.1f}%"))
        fast, paper, anp = cell("grad-prune-fast"), cell("grad-prune-paper"), cell("anp")
        if fast and paper:
            # Two counts: report.json's gradient_passes (scoring passes while pruning, where the modes differ)
            # and every backward pass of the run (fine-tuning included, which both modes share).
            total = paper["backward_passes"][0] / max(fast["backward_passes"][0], 1)
            evidence = f"all backward passes {total:.1f}x ({paper['backward_passes'][0]:.0f} vs " \
                       f"{fast['backward_passes'][0]:.0f})"
            if fast["scoring_passes"] and paper["scoring_passes"]:
                ratio = paper["scoring_passes"][0] / max(fast["scoring_passes"][0], 1)
                evidence = f"scoring passes {ratio:.1f}x ({paper['scoring_passes'][0]:.0f} vs " \
                           f"{fast['scoring_passes'][0]:.0f}); " + evidence
                out.append((f"fast mode >= 5x fewer gradient (scoring) passes than paper mode ({where})",
                            ratio >= 5, evidence))
            out.append((f"fast mode >= 5x fewer backward passes in all than paper mode ({where})", total >= 5,
                        evidence))
        if fast and anp:
            ratio = fast["seconds"][0] / max(anp["seconds"][0], 1e-9)
            out.append((f"fast mode wall time <= 0.5x ANP's ({where})", ratio <= 0.5,
                        f"{ratio:.2f}x ({fast['seconds'][0]:.0f} s vs {anp['seconds'][0]:.0f} s)"))
    return out


def goals_markdown(rows: list[dict[str, str]]) -> str:
    checked = goals(rows)
    if not checked:
        return (f"No goal applies to these rows (the goals are checked on the rows of {', '.join(ASR_GOALS)}, and on "
                "grad-prune-free's rows of clean models).")
    lines = ["| goal | met | measured |", "|---|---|---|"]
    for goal, met, evidence in checked:
        lines.append(f"| {goal} | {'yes' if met else 'NO'} | {evidence} |")
    return "\n".join(lines)


# (full method, the same without pruning) pairs: what the pruning half is worth.
PRUNING_PAIRS = (("grad-prune-fast", "unlearn-ft-known"), ("grad-prune-free", "unlearn-ft-free"))


def pruning_worth(rows: list[dict[str, str]]) -> str:
    """A markdown table: the full method against unlearning fine-tuning alone, and whether pruning added anything.

    "yes": a lower ASR or a higher clean accuracy by at least half a point, the other not worse by more than half a
    point; "trade-off": better on one, worse on the other; "no": neither better. Users deserve to know when the
    cheaper step is enough.
    """
    summary = summarise(rows)
    lines = ["| model, attack, budget | full method | ASR % with / without pruning | acc % with / without | "
             "pruning adds |", "|---|---|---|---|---|"]
    for arch, attack, n, d in sorted(k for k in summary if k[3] in dict(PRUNING_PAIRS) and k[1] != CLEAN):
        full, alone = summary[(arch, attack, n, d)], summary.get((arch, attack, n, dict(PRUNING_PAIRS)[d]))
        if not (full["n"] and alone and alone["n"]):
            continue
        d_asr = 100 * (alone["asr"][0] - full["asr"][0])  # > 0: pruning lowered ASR
        d_acc = 100 * (full["clean_acc"][0] - alone["clean_acc"][0])  # > 0: pruning kept more accuracy
        better, worse = max(d_asr, d_acc) >= 0.5, min(d_asr, d_acc) < -0.5
        verdict = "trade-off" if better and worse else "yes" if better else "**no**"
        lines.append(f"| {arch}, {attack}, {n}/class | {d} | {100 * full['asr'][0]:.1f} / "
                     f"{100 * alone['asr'][0]:.1f} | {100 * full['clean_acc'][0]:.1f} / "
                     f"{100 * alone['clean_acc'][0]:.1f} | {verdict} |")
    if len(lines) == 2:
        return "No pair of a full method and its fine-tuning-only ablation in these rows."
    return "\n".join(lines)


def plot(rows: list[dict[str, str]], defenses: list[str], path: Path) -> Path:
    """ASR against clean accuracy, one panel per (arch, attack) at the largest clean budget; mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    panels = sorted({k[:2] for k in summary if k[1] != CLEAN})
    if not panels:
        return path
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    markers = "osD^v<>pP*Xh"
    for ax, (arch, attack) in zip(axes[0], panels, strict=True):
        n = max(k[2] for k in summary if k[:2] == (arch, attack))
        for i, d in enumerate(defenses):
            c = summary.get((arch, attack, n, d))
            if not c or not c["n"]:
                continue
            ax.errorbar(100 * c["clean_acc"][0], 100 * c["asr"][0], xerr=100 * c["clean_acc"][1],
                        yerr=100 * c["asr"][1], fmt=markers[i % len(markers)], label=d, capsize=2,
                        color=plt.cm.tab20(i % 20))
        ax.set(title=f"{arch}, {attack}, {n}/class", xlabel="clean accuracy %", ylabel="attack success rate %")
        ax.set_yscale("symlog", linthresh=5)  # linear below 5% where the goals are, log above
        ax.set_yticks([0, 2, 5, 10, 20, 50, 100], ["0", "2", "5", "10", "20", "50", "100"])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
