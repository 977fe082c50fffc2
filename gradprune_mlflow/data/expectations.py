"""The Great Expectations (GX Core 1.x) suite a clean set must pass before any model is touched.

The suite runs over one table: `manifest.csv` as written, joined with facts read from every image (does the file
exist inside the set, its actual sha256, its decoded shape, how many rows share its label). Checks: exact columns, no
nulls, labels in 0..K-1, every class present with at least `min_per_class` images, unique paths and hashes, hashes
that match the files, images that decode to `input_shape`, and row-count bounds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradprune_mlflow.data.cleanset import MANIFEST_COLUMNS, DatasetMeta, decode_png, read_meta, sha256_bytes, to_chw
from gradprune_mlflow.errors import DataError

# GX reports usage to its makers unless told not to; a sanitizer inspecting trusted data should not phone home.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

FACT_COLUMNS = ["path_inside_set", "file_exists", "sha256_actual", "decoded_shape", "class_count"]
SUITE_NAME = "gradprune-clean-set"


@dataclass(frozen=True)
class Checks:
    """Limits the suite enforces; None means the default derived from dataset.json."""

    # Every class needs at least this many images (the validation split takes 10% of each, at least one).
    min_per_class: int = 10
    # Row-count bounds; min_rows defaults to num_classes * min_per_class.
    min_rows: int | None = None
    # The whole set is held in memory while sanitizing.
    max_rows: int = 200_000


@dataclass
class ValidationOutcome:
    """The suite's verdict: `success`, the GX result object `result`, and `summary`, a JSON-able dict."""

    success: bool
    summary: dict[str, Any]
    result: Any = field(repr=False, default=None)

    @property
    def failed(self) -> list[str]:
        """One line per failing expectation: what was checked, on which column, and what was seen."""
        return list(self.summary["failed"])

    def to_json(self) -> str:
        return json.dumps(self.summary, indent=2, default=str)

    def raise_for_failure(self) -> ValidationOutcome:
        """Return self, or raise CleanSetRejected naming the failing expectations."""
        if not self.success:
            raise CleanSetRejected(self)
        return self


class CleanSetRejected(DataError):
    """The clean set failed its expectations; `.outcome` holds the full result, the message names what failed."""

    def __init__(self, outcome: ValidationOutcome):
        where = outcome.summary.get("data", {}).get("source", "clean set")
        super().__init__(f"{where} failed validation: {'; '.join(outcome.failed)}; fix the set and re-push it")
        self.outcome = outcome


def image_facts(folder: str | Path) -> tuple[DatasetMeta, pd.DataFrame]:
    """Read dataset.json and manifest.csv (as written: all columns, strings) and join facts from every image.

    Returns (meta, table). Raises DataError when dataset.json or manifest.csv cannot be read at all; anything wrong
    inside the manifest is left for the suite to report.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    path = folder / "manifest.csv"
    if not path.is_file():
        raise DataError(f"{folder} has no manifest.csv; build the set with `gradprune dataset pack`")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV ({exc})") from None
    root = folder.resolve()
    facts = [_facts(root, row.get("path")) for row in table.to_dict("records")]
    for col in FACT_COLUMNS[:-1]:
        table[col] = [f[col] for f in facts]
    labels = table["label"] if "label" in table else pd.Series([None] * len(table), dtype=object)
    table["class_count"] = labels.map(labels.value_counts()).astype("Int64")
    return meta, table


def _facts(root: Path, rel: Any) -> dict[str, Any]:
    out = {"path_inside_set": False, "file_exists": False, "sha256_actual": None, "decoded_shape": None}
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        return out
    path = (root / rel).resolve()
    out["path_inside_set"] = root in path.parents
    if not out["path_inside_set"] or not path.is_file():
        return out
    out["file_exists"] = True
    data = path.read_bytes()
    out["sha256_actual"] = sha256_bytes(data)
    try:
        out["decoded_shape"] = "x".join(map(str, to_chw(decode_png(data)).shape))
    except (OSError, ValueError):
        pass
    return out


def build_suite(meta: DatasetMeta, checks: Checks | None = None):
    """The expectation suite for a set described by `meta`; each expectation says in `meta.check` what it checks."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    checks = checks or Checks()
    k = meta.num_classes
    labels = [str(c) for c in range(k)]
    shape = "x".join(map(str, meta.input_shape))
    min_rows = checks.min_rows if checks.min_rows is not None else k * checks.min_per_class

    def check(what: str, expectation):
        expectation.meta = {"check": what}
        return expectation

    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for exp in [
        check("exact columns", gxe.ExpectTableColumnsToMatchOrderedList(column_list=MANIFEST_COLUMNS + FACT_COLUMNS)),
        *[check("no nulls", gxe.ExpectColumnValuesToNotBeNull(column=c)) for c in MANIFEST_COLUMNS],
        check(f"labels in 0..{k - 1}", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels)),
        check("every class present", gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=labels)),
        check(f"at least {checks.min_per_class} images per class",
              gxe.ExpectColumnValuesToBeBetween(column="class_count", min_value=checks.min_per_class)),
        check("unique paths", gxe.ExpectColumnValuesToBeUnique(column="path")),
        check("unique hashes", gxe.ExpectColumnValuesToBeUnique(column="sha256")),
        check("paths inside the set", gxe.ExpectColumnValuesToBeInSet(column="path_inside_set", value_set=[True])),
        check("files exist", gxe.ExpectColumnValuesToBeInSet(column="file_exists", value_set=[True])),
        check("sha256 matches the file", gxe.ExpectColumnPairValuesToBeEqual(
            column_A="sha256", column_B="sha256_actual", ignore_row_if="neither")),
        check("images decode", gxe.ExpectColumnValuesToNotBeNull(column="decoded_shape")),
        check(f"image shape {shape}", gxe.ExpectColumnValuesToBeInSet(column="decoded_shape", value_set=[shape])),
        check(f"row count in {min_rows}..{checks.max_rows}",
              gxe.ExpectTableRowCountToBeBetween(min_value=min_rows, max_value=checks.max_rows)),
    ]:
        suite.add_expectation(exp)
    return suite


def validate_clean_set(
    folder: str | Path, checks: Checks | None = None, *, source: str | None = None, raise_on_failure: bool = False
) -> ValidationOutcome:
    """Run the suite on the clean set in `folder` (local); `source` is the URI to name in messages and the summary.

    Returns a ValidationOutcome (its `summary` is what gets logged as the GE result artifact). Raises DataError when
    dataset.json or manifest.csv cannot be read, and CleanSetRejected (a DataError) on failure if `raise_on_failure`.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    meta, table = image_facts(folder)
    context = gx.get_context(mode="ephemeral")  # before the suite: GX binds suites to the current context
    # GX draws progress bars on stderr by default; a check inside a flow or a CLI table should not.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    suite = build_suite(meta, checks or Checks())
    batch = (
        context.data_sources.add_pandas("clean-set")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": table})
    )
    result = batch.validate(suite, result_format="SUMMARY")
    manifest = Path(folder) / "manifest.csv"
    outcome = ValidationOutcome(bool(result.success), _summary(result, source or str(folder), meta, table, manifest),
                                result)
    return outcome.raise_for_failure() if raise_on_failure else outcome


def _summary(result, source: str, meta: DatasetMeta, table: pd.DataFrame, manifest: Path) -> dict[str, Any]:
    rows, failed = [], []
    for r in result.results:
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k in ("column", "column_A", "column_B")}
        keys = ("observed_value", "unexpected_count", "partial_unexpected_list")
        details = {k: _plain(r.result.get(k)) for k in keys if r.result.get(k) not in (None, [])}
        if r.exception_info and r.exception_info.get("raised_exception"):
            details["exception"] = str(r.exception_info.get("exception_message"))
        what = (cfg.meta or {}).get("check", cfg.type)
        rows.append({"check": what, "expectation": cfg.type, **kwargs, "success": bool(r.success), **details})
        if not r.success:
            failed.append(_describe(what, cfg.type, kwargs, details))
    stats = result.statistics
    return {
        "success": bool(result.success),
        "suite": SUITE_NAME,
        "data": {"source": source, "rows": len(table), "num_classes": meta.num_classes,
                 "input_shape": list(meta.input_shape),
                 "manifest_sha256": sha256_bytes(manifest.read_bytes()) if manifest.is_file() else None},
        "statistics": {k: stats.get(k) for k in ("evaluated_expectations", "successful_expectations",
                                                  "unsuccessful_expectations")},
        "failed": failed,
        "expectations": rows,
    }


def _plain(value: Any) -> Any:
    """JSON-able and short: numpy scalars to Python, NaN to None, long strings (hashes) cut to 12 characters."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, str) and len(value) > 24:
        return value[:12] + "..."
    return value


def _describe(what: str, kind: str, kwargs: dict[str, Any], details: dict[str, Any]) -> str:
    seen = ""
    if "unexpected_count" in details:
        sample = details.get("partial_unexpected_list", [])[:3]
        seen = f"{details['unexpected_count']} bad row(s)" + (f", e.g. {sample}" if sample else "")
    elif "observed_value" in details:
        seen = f"observed {details['observed_value']}"
    elif "exception" in details:
        seen = details["exception"]
    on = f" on {kwargs['column']}" if "column" in kwargs else ""
    return f"{what} ({kind}{on}{': ' + seen if seen else ''})"
