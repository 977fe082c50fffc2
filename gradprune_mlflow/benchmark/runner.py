"""Run a preset: every defense on the same backdoored model, clean set and seed; measure on test data afterwards.

Rows are appended to a CSV as they finish and the runner skips what is already there, so a long run that stops can
be resumed with the same command. A defense that fails gives a row with its error, not a crash of the whole run.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gradprune_mlflow import lab
from gradprune_mlflow.benchmark.counting import BackwardCounter
from gradprune_mlflow.benchmark.presets import CLEAN, Preset
from gradprune_mlflow.benchmark.registry import Defense, get_defense, run_defense
from gradprune_mlflow.defense.metrics import evaluate
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.lab.attacks import known_attack

FIELDS = ["arch", "attack", "per_class", "seed", "defense", "uses_trigger", "clean_acc", "asr", "ra", "acc_before",
          "asr_before", "seconds", "backward_passes", "flagged", "pruned", "device", "error", "info"]
KEY = ("arch", "attack", "per_class", "seed", "defense")
CLEAN_ASR_TRIGGER = "badnets"


@dataclass(frozen=True)
class Job:
    arch: str
    attack: str
    seed: int
    per_class: int
    defense: str

    def key(self) -> tuple[str, ...]:
        return (self.arch, self.attack, str(self.per_class), str(self.seed), self.defense)


def jobs(preset: Preset, defenses: list[str], split: str = "dev") -> list[Job]:
    """All runs of a preset's split, grouped so that one backdoored model and one clean set serve consecutive runs."""
    return [Job(a, t, s, n, d) for a in preset.archs for t in preset.attacks for s in preset.seeds(split)
            for n in preset.per_class for d in defenses]


def check_attacks(attacks: tuple[str, ...]) -> None:
    """Unknown attack names fail before any training, listing the valid ones."""
    for name in attacks:
        known_attack(name, also=(CLEAN,))


def model_for(job_attack: str, arch: str, preset: Preset, seed: int, cache_dir: Path, dev: torch.device):
    """The model a job defends and the trigger it is measured with.

    A clean model (attack "clean") is measured with BadNets' trigger only so that the row has the same columns; its
    ASR means nothing and the tables leave it out (CLEAN_ASR_TRIGGER names the trigger in the rows' info).
    """
    common = dict(n_train=preset.n_train, epochs=preset.epochs, seed=seed, cache_dir=cache_dir, image=preset.image,
                  device=str(dev))
    if job_attack == CLEAN:
        return lab.clean_model(arch, **common), lab.attack_trigger(CLEAN_ASR_TRIGGER)
    return lab.backdoored_model(arch, job_attack, **common), lab.attack_trigger(job_attack)


def device_name(device: torch.device) -> str:
    """'cpu (N threads, machine)' or the CUDA card's name: every GPU number names its card."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows already written to `path` (none if it does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def run(preset: Preset, defenses: list[str], out_csv: Path, *, cache_dir: Path, device: str = "auto",
        console: Console | None = None, split: str = "dev") -> list[dict[str, str]]:
    """Run every job of `preset`'s `split` not yet in `out_csv`, appending rows; return all rows of the file."""
    console = console or Console()
    specs = [get_defense(d) for d in defenses]  # unknown names fail before any training
    check_attacks(preset.attacks)
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    done = {tuple(r[k] for k in KEY) for r in read_rows(out_csv)}
    todo = [j for j in jobs(preset, defenses, split) if j.key() not in done]
    console.print(f"[bold]{preset.name}[/]: {len(todo)} runs to do, {len(done)} already in {out_csv}; "
                  f"device {device_name(dev)}")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    fresh = not out_csv.is_file()
    with out_csv.open("a", newline="") as fh, _progress(console) as bar:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if fresh:
            writer.writeheader()
        task = bar.add_task("benchmark", total=len(todo))
        eta = Eta(todo)
        for job, env in _environments(todo, preset, cache_dir, dev, bar, task):
            bar.update(task, description=f"{job.arch} {job.attack} s{job.seed} n{job.per_class} {job.defense}")
            row = run_one(job, specs[defenses.index(job.defense)], env, dev, preset.options.get(job.defense, {}))
            writer.writerow(row)
            fh.flush()
            bar.advance(task)
            console.print(f"{_line(row)}  [dim]{eta.done(job, time.perf_counter())}[/]")
    return read_rows(out_csv)


class Eta:
    """Runs done, time spent and a rough time left for a log that has no progress bar: each run left is counted at
    the mean wall time of the runs of its defense done so far (the mean of all runs while a defense has none; a
    defense's cost varies far more between defenses than between models)."""

    def __init__(self, todo: list[Job], start: float | None = None):
        self.left = [j.defense for j in todo]
        self.start = time.perf_counter() if start is None else start
        self.last, self.spent = self.start, {}

    def done(self, job: Job, now: float) -> str:
        self.spent.setdefault(job.defense, []).append(now - self.last)
        self.last = now
        self.left.remove(job.defense)
        every = [s for v in self.spent.values() for s in v]
        mean = {d: sum(v) / len(v) for d, v in self.spent.items()}
        left = sum(mean.get(d, sum(every) / len(every)) for d in self.left)
        total = len(every) + len(self.left)
        return f"[{len(every)}/{total}, {(now - self.start) / 60:.0f} min so far, about {left / 60:.0f} min left]"


@dataclass
class _Env:
    model: torch.nn.Module
    clean: Any
    trigger: Any
    test: Any
    before: dict


def _environments(todo: list[Job], preset: Preset, cache_dir: Path, dev: torch.device, bar, task) -> Iterator:
    """Yield (job, env), building each backdoored model, clean set and 'before' measurement once."""
    test = lab.test_data(preset.test_images, preset.image)  # coloured with the test images' own colour draw
    model_key = clean_key = None
    for job in todo:
        if (job.arch, job.attack, job.seed) != model_key:
            model_key = (job.arch, job.attack, job.seed)
            bar.update(task, description=f"training or loading {job.arch} ({job.attack}, seed {job.seed})")
            model, trigger = model_for(job.attack, job.arch, preset, job.seed, cache_dir, dev)
            clean_key = None
        if (model_key, job.per_class) != clean_key:
            clean_key = (model_key, job.per_class)
            clean = lab.trusted_set(job.per_class, seed=job.seed, image=preset.image)
            before = measure(model, clean, trigger, test, dev)
        yield job, _Env(model, clean, trigger, test, before)


def measure(model: torch.nn.Module, clean, trigger, test, dev: torch.device) -> dict:
    """Clean accuracy, ASR and RA of `model` on the test data, with the attack's real trigger."""
    net = Normalized(model, clean.meta.mean, clean.meta.std).to(dev).eval()
    return evaluate(net, test, trigger)


def run_one(job: Job, spec: Defense, env: _Env, dev: torch.device, options: dict | None = None) -> dict[str, Any]:
    """One defense on one model: timed, its backward passes counted, measured afterwards on the test data."""
    row: dict[str, Any] = {"arch": job.arch, "attack": job.attack, "per_class": job.per_class, "seed": job.seed,
                           "defense": job.defense, "uses_trigger": spec.uses_trigger, "device": device_name(dev),
                           "acc_before": env.before["clean_accuracy"], "asr_before": env.before["attack_success_rate"]}
    model = env.model.to(dev)
    torch.manual_seed(job.seed)
    start = time.perf_counter()
    try:
        with BackwardCounter(model) as counter:
            defended = run_defense(spec, model, env.clean, env.trigger, job.seed, **(options or {}))
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["backward_passes"] = counter.count
        after = measure(counter.detach(defended.model), env.clean, env.trigger, env.test, dev)
    except Exception as exc:  # one failing defense must not end a run of hundreds
        row.update(seconds=round(time.perf_counter() - start, 2), error=f"{type(exc).__name__}: {exc}"[:300])
        return row
    finally:
        env.model.cpu()
    info = dict(defended.info)
    if job.attack == CLEAN:
        info["asr_trigger"] = CLEAN_ASR_TRIGGER  # a clean model's ASR means nothing: the tables skip it
    row.update(clean_acc=after["clean_accuracy"], asr=after["attack_success_rate"], ra=after["robust_accuracy"],
               flagged=info.pop("flagged", ""), pruned=info.pop("pruned", ""), info=json.dumps(info, sort_keys=True))
    return row


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not console.is_terminal, transient=True)


def _line(row: dict[str, Any]) -> str:
    name = f'{row["arch"]} {row["attack"]} seed {row["seed"]} n={row["per_class"]} {row["defense"]}'
    if row.get("error"):
        return f"  {name}: [red]failed[/] {row['error']}"
    return (f"  {name}: acc {row['acc_before']:.4f} -> {row['clean_acc']:.4f}  ASR {row['asr_before']:.4f} -> "
            f"{row['asr']:.4f}  {row['seconds']} s  {row['backward_passes']} passes")
