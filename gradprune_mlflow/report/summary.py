"""The before/after table in markdown, and the texts built on it: the run description (`mlflow.note.content`), the
sanitized version's description and the Prefect flow run's artifact all show the same table.
"""

from __future__ import annotations

from typing import Any

ROWS = (("clean accuracy", "clean_accuracy"), ("attack success rate", "attack_success_rate"),
        ("robust accuracy", "robust_accuracy"), ("clean images to target", "clean_target_rate"),
        ("synthesized-trigger success rate (not the attack's)", "synthesized_trigger_success_rate"),
        ("robust accuracy, synthesized trigger", "synthesized_trigger_robust_accuracy"))
# Shown only when measured: a trigger-free run without an evaluation trigger has no real trigger to measure with.
SYNTHESIZED = {"synthesized_trigger_success_rate", "synthesized_trigger_robust_accuracy"}


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal, or '-' when it is missing."""
    return f"{100 * value:.1f}%" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The (label, key) rows of the before/after table for this report."""
    sides = [report.get("before") or {}, report.get("after") or {}]
    return [(label, key) for label, key in ROWS
            if key not in SYNTHESIZED or any(side.get(key) is not None for side in sides)]


def before_after_table(report: dict[str, Any]) -> str:
    """The markdown table of clean accuracy, attack success rate, robust accuracy and clean target rate, before and
    after."""
    before, after = report.get("before") or {}, report.get("after") or {}
    lines = ["| metric | before | after |", "|---|---:|---:|"]
    lines += [f"| {label} | {pct(before.get(key))} | {pct(after.get(key))} |" for label, key in rows(report)]
    return "\n".join(lines)


def how_measured(report: dict[str, Any]) -> str:
    """One sentence: the trigger (and detection), what the attack was measured with, the data, the filters pruned."""
    det = report.get("detection") or {}
    trigger = str(report.get("trigger_source", "?"))
    if det:
        index = det.get("anomaly_index")
        index = f"{index:.2f}" if isinstance(index, int | float) else "?"
        flagged = "not flagged, top candidate"
        if det.get("flagged"):  # older reports, from before the probes, have no flagged_by
            by = det.get("flagged_by")
            flagged = f"flagged by the {by.replace('_', ' ')}" if by else "flagged"
        score = det.get("score") or {}
        scored = f", flag score {score['value']:.2f} of {score['threshold']:.2f}, {score['verdict']}" if score else ""
        trigger += f" (class {det.get('target')} {flagged}, anomaly index {index}{scored})"
    return (f"Trigger: {trigger}; attack measured with the {report.get('asr_measured_with', '?')} trigger; "
            f"evaluated on {report.get('evaluated_on', '?')}. Pruned {report.get('pruned_filters', '?')} of "
            f"{report.get('total_filters', '?')} filters ({report.get('mode', '?')} mode).")


def verification_failed(report: dict[str, Any]) -> bool:
    """Whether the independent search found a working trigger in the sanitized model."""
    return (report.get("verification") or {}).get("verdict") == "failed"


def verification_finding(report: dict[str, Any]) -> str:
    """What the failed verification found, in one clause."""
    v = report.get("verification") or {}
    index = v.get("anomaly_index")
    index = f"{index:.2f}" if isinstance(index, int | float) else "?"
    by = str(v.get("flagged_by") or "anomaly_index").replace("_", " ")
    same = ", the class the defense flagged" if v.get("same_target") else ""
    return (f"an independent search on {v.get('images', '?')} held-out images found a working trigger for class "
            f"{v.get('class', '?')}{same} ({v.get('family', '?')} family, flagged by the {by}, anomaly index {index}, "
            f"synthesized-trigger success rate {pct(v.get('synthesized_trigger_success_rate'))})")


def suspect(report: dict[str, Any]) -> bool:
    """Whether nothing was flagged but the flag score is in the suspect band."""
    return ((report.get("detection") or {}).get("score") or {}).get("verdict") == "suspect"


def suspect_reason(report: dict[str, Any]) -> str:
    """The one-line reason of a suspect model: its score and each detector's part."""
    from gradprune_mlflow.defense.evidence import describe

    return f"suspect, not flagged: {describe(report['detection']['score'])}"


def unverified_reason(report: dict[str, Any], sanitized_version: str) -> str:
    """The source version's one-line reason when verification failed."""
    return (f"verification failed: {verification_finding(report)}; review version {sanitized_version} before "
            "promoting it")


def verification_headline(report: dict[str, Any]) -> str | None:
    """The verification verdict in one line, what reviewers read first; None for reports without one."""
    v = report.get("verification")
    if not v:
        return None
    verdict = v.get("verdict")
    if verdict == "passed":
        return (f"**Verification: passed** — an independent search on {v.get('images', '?')} held-out images found no "
                "trigger (every class, both trigger families, the defense's thresholds).")
    if verdict == "failed":
        return (f"**Verification FAILED** — {verification_finding(report)}. The alias `sanitized` was not moved to "
                "this version: review it before promoting it.")
    if verdict == "measured":
        return (f"Verification: measured with the {v.get('with', '?')}: attack success rate after "
                f"{pct(v.get('attack_success_rate'))}.")
    return f"Verification: not run ({v.get('reason', '?')})."


def version_description(report: dict[str, Any], source_version: str, run_link: str) -> str:
    """The sanitized version's description: the verification verdict, where it came from, the table, how it was
    measured."""
    head = f"Sanitized by gradprune (Grad-Prune) from version {source_version}; run: [{run_link}]({run_link})."
    verdict = verification_headline(report)
    return "\n".join(([verdict, ""] if verdict else []) + [head, "", before_after_table(report), "",
                                                            how_measured(report)])


def run_description(report: dict[str, Any], model: str, version: str, *, validation_ok: bool | None = None,
                    sanitized_version: str | None = None) -> str:
    """The run's markdown description (`mlflow.note.content`): the table, how it was measured, where the full
    report is, and the version it produced when there is one."""
    verdict = verification_headline(report)
    lines = ([verdict, ""] if verdict else []) + [
        f"**gradprune** sanitize run for `{model}` version {version}.", "", before_after_table(report), "",
        how_measured(report)]
    if validation_ok is not None:
        lines.append(f"Clean set validation (Great Expectations): {'passed' if validation_ok else 'FAILED'}.")
    if sanitized_version and verification_failed(report):
        lines.append(f"Registered as version {sanitized_version} without the alias `sanitized` (verification "
                     "failed): review it before promoting it.")
    elif sanitized_version:
        lines.append(f"Registered as version {sanitized_version} with the alias `sanitized`.")
    elif report.get("sanitized") is False:
        lines.append("No model was registered: no backdoor was flagged (on_clean=skip).")
    lines += ["", "Full report with figures: artifact `report.html`; raw numbers: `report.json`."]
    return "\n".join(lines)


def outcome_markdown(outcome: dict[str, Any]) -> str:
    """A version's outcome (the scan's row) as markdown: status, the table and the run link."""
    title = f"## gradprune: {outcome['model']} version {outcome['version']}: {outcome['status']}"
    lines = [title, ""]
    if outcome.get("sanitized_version"):
        alias = "not given the alias `sanitized`" if outcome.get("status") == "unverified" else "alias `sanitized`"
        lines += [f"Sanitized version: {outcome['sanitized_version']} ({alias}).", ""]
    if outcome.get("reason"):
        lines += [f"Reason: {outcome['reason']}", ""]
    if outcome.get("before"):
        lines += [before_after_table({"before": outcome.get("before"), "after": outcome.get("after")}), ""]
    if outcome.get("run_url"):
        lines.append(f"MLflow run: [{outcome['run_url']}]({outcome['run_url']})")
    return "\n".join(lines).rstrip() + "\n"
