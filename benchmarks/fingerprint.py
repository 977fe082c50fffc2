"""Fingerprint of one sanitize run: the sanitized weights' sha256 and the report's numbers, for refactors.

    .venv/bin/python benchmarks/fingerprint.py [--out fingerprint.json]

Trains (or reuses, from benchmarks/cache) a small backdoored CNN, sanitizes it once with the known trigger and once
trigger-free on CPU with one thread and a fixed seed, and prints one JSON line per run. A change that should not alter
behaviour must leave every line identical: same weights bit for bit, same report numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

from gradprune_mlflow import lab, load_clean_set, sanitize

HERE = Path(__file__).parent
REPORT_KEYS = ("trigger_source", "detection", "before", "after", "pruned_filters", "gradient_passes")


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's state_dict as torch.save writes it (names, shapes and every bit of every tensor)."""
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the lines to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = lab.backdoored_model("small_cnn", "badnets", n_train=10_000, epochs=2, seed=0,
                                 cache_dir=HERE / "cache")
    test = lab.test_data(2_000)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = load_clean_set(lab.trusted_clean_set(Path(tmp) / "clean", 30, seed=0))
        trigger = lab.attack_trigger("badnets")
        for name, known in (("known", trigger), ("free", None)):
            result = sanitize(model, clean, known, eval_trigger=trigger, test_set=test, seed=0, on_clean="sanitize",
                              device="cpu")
            report = {k: result.report.get(k) for k in REPORT_KEYS}
            digest = weights_digest(result.model) if result.model is not None else None
            lines.append(json.dumps({"run": name, "weights_sha256": digest, **report}, sort_keys=True))
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
