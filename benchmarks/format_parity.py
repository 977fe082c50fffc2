"""One backdoored model saved in every format gradprune takes, each sanitized the same way: the numbers must agree.

    .venv/bin/python benchmarks/format_parity.py [--runs fast-known fast-free] [--per-class 30]

The fingerprint's small CNN (BadNets, grey 28x28, from benchmarks/cache or trained) is written as MLflow writes it by
default (pt2, from a one-image input example), as an MLflow pickle-format model, as a torch.jit.save file of a
scripted copy and as a whole-module torch.save file. Each is loaded the way `gradprune sanitize` loads it (scanned,
then as an adapter for pt2 and TorchScript) and sanitized on CPU with one thread and the same seed, the known trigger
or none; measured on 2,000 test images with the real trigger (evaluation only). Writes
benchmarks/results/format-parity.csv and .md after every row.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import mlflow.pytorch
import torch
from quality import RUNS, _row
from zoo_quality import write_table

from gradprune_mlflow import lab, load_clean_set, sanitize
from gradprune_mlflow.models.io import load_model

HERE = Path(__file__).parent


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, by name in sorted order: the same for the same weights in any format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_formats(model: torch.nn.Module, folder: Path) -> dict[str, Path]:
    """The model in each format, as its users would write it."""
    example = torch.rand(1, 1, 28, 28)
    paths = {"pt2": folder / "pt2", "pickle": folder / "pickle", "torchscript": folder / "script.pt",
             "torch-save": folder / "module.pt"}
    with warnings.catch_warnings():  # deprecation notices of torch.jit and MLflow's pickle format: not ours to act on
        warnings.simplefilter("ignore")
        mlflow.pytorch.save_model(model, str(paths["pt2"]), input_example=example.numpy(), pip_requirements=["torch"])
        mlflow.pytorch.save_model(model, str(paths["pickle"]), serialization_format="pickle",
                                  pip_requirements=["torch"])
        torch.jit.save(torch.jit.script(model), paths["torchscript"])
        torch.save(model, paths["torch-save"])
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["fast-known", "fast-free"], choices=list(RUNS))
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "format-parity")
    args = ap.parse_args(argv)
    git = ["git", "-C", str(HERE)]
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout:
        commit += " with uncommitted changes"
    torch.set_num_threads(1)
    model = lab.backdoored_model("small_cnn", "badnets", n_train=10_000, epochs=2, seed=0, cache_dir=HERE / "cache")
    trigger, test = lab.attack_trigger("badnets"), lab.test_data(2_000)
    header = (f"Command: `.venv/bin/python benchmarks/format_parity.py {' '.join(sys.argv[1:])}`  \n"
              f"Date {date.today()}, commit {commit}; {platform.machine()}, 1 thread, CPU. One small_cnn (BadNets, "
              f"gray28, 10,000 attacker images, 2 epochs, seed 0) in each format, {args.per_class} trusted images "
              "per class, defense seed 0, 2,000 test images; ASR with the real trigger, given for evaluation only. "
              "Development figures: the fingerprint's model.\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = load_clean_set(lab.trusted_clean_set(Path(tmp) / "clean", args.per_class, seed=0))
        paths = save_formats(model, Path(tmp))
        for run in args.runs:
            known, mode = RUNS[run]
            for fmt, path in paths.items():
                start = time.perf_counter()
                result = sanitize(load_model(path), clean, trigger if known else None, mode=mode, seed=0,
                                  eval_trigger=trigger, test_set=test, on_clean="sanitize", device="cpu")
                row = _row("badnets", run, result.report, time.perf_counter() - start)
                digest = weights_digest(getattr(result.model, "inner", result.model)) if result.model else ""
                rows.append({"format": fmt, **row, "weights_sha256": digest[:12]})
                print(rows[-1], flush=True)
                write_table(args.out, header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
