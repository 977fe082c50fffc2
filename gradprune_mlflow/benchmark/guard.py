"""Honest test figures: a test table is written only for the configuration its preset was last developed with.

Every development run records a fingerprint of its configuration: the preset's fields and defense options (seeds
aside: they are what differs between the splits) and the committed version of the code that decides what a defense
does (the git tree of the paths in CODE, plus any uncommitted change to them). A test run compares its own fingerprint
with the last development run's and refuses when they differ, unless a reason is given; the reason then goes into
the test table's header. Both fingerprints are kept in STEM.config.json beside the development CSV.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gradprune_mlflow.benchmark.presets import Preset

# The code whose settings a development run may have tuned: the defense, its configuration and the baselines.
CODE = ("gradprune_mlflow/defense", "gradprune_mlflow/config.py", "gradprune_mlflow/benchmark/baselines",
        "gradprune_mlflow/benchmark/gradprune.py")
REPO = Path(__file__).resolve().parents[2]


class ChangedConfig(Exception):
    """The configuration differs from the last development run's (or there was none)."""


def code_version(repo: Path = REPO) -> str:
    """A hash of `git ls-tree HEAD CODE` and of any uncommitted change to CODE ("no git" outside a checkout)."""
    try:
        tree = _git(repo, "ls-tree", "-r", "HEAD", *CODE)
        dirty = _git(repo, "diff", "HEAD", "--", *CODE)
    except (OSError, subprocess.CalledProcessError):
        return "no git"
    return hashlib.sha256((tree + "\n" + dirty).encode()).hexdigest()[:16]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def configuration(preset: Preset, code: str) -> dict[str, Any]:
    """What the fingerprint covers: the preset's fields and options without its seeds, and the code's version."""
    fields = {k: v for k, v in asdict(preset).items() if k not in ("dev_seeds", "test_seeds")}
    return {"preset": json.loads(json.dumps(fields, sort_keys=True, default=list)), "code": code}


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def record_path(dev_stem: Path) -> Path:
    return dev_stem.with_suffix(".config.json")


def record(dev_stem: Path, split: str, config: dict[str, Any], **extra: Any) -> None:
    """Keep `config`'s fingerprint as the last `split` run's, beside the development CSV."""
    path = record_path(dev_stem)
    kept = json.loads(path.read_text()) if path.is_file() else {}
    kept[split] = {"fingerprint": fingerprint(config), "config": config,
                   "written": datetime.now(UTC).isoformat(timespec="seconds"), **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")


def check_test(dev_stem: Path, config: dict[str, Any], accept_reason: str | None) -> None:
    """Raise ChangedConfig unless the last development run had this configuration or a reason is given."""
    path = record_path(dev_stem)
    dev = (json.loads(path.read_text()) if path.is_file() else {}).get("dev")
    if accept_reason or (dev is not None and dev["fingerprint"] == fingerprint(config)):
        return
    if dev is None:
        raise ChangedConfig(f"no development run of this preset is recorded ({path}); run --split dev first, or "
                            "pass --accept-changed-config REASON")
    changed = sorted(k for k in config["preset"] if config["preset"][k] != dev["config"]["preset"].get(k))
    if config["code"] != dev["config"]["code"]:
        changed.append("code of " + ", ".join(CODE))
    raise ChangedConfig(f"the configuration changed after the last development run ({dev['written']}): "
                        f"{', '.join(changed)}; run --split dev again, or pass --accept-changed-config REASON")
