"""Writing triggers as trigger files (docs/contracts.md, "Trigger files"): what trigger-free mode found, in a form
that `load_trigger` (defense/triggers.py) reads back as the same trigger."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradprune_mlflow.defense.triggers import MaskTrigger, Trigger


def save_mask_trigger(trigger: MaskTrigger, folder: str | Path, name: str = "trigger") -> Path:
    """Write a mask trigger as `name.json` + mask and pattern PNGs (the 'mask' kind) and return the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mask = trigger.mask.detach().cpu()
    mask = mask.mean(0) if mask.ndim == 3 else mask
    Image.fromarray(_to_uint8(mask)).save(folder / f"{name}_mask.png")
    pattern = trigger.pattern.detach().cpu()
    pattern = pattern.expand(pattern.shape[0], *mask.shape[-2:]) if pattern.ndim == 3 else pattern
    Image.fromarray(_to_uint8(pattern[0] if pattern.shape[0] == 1 else pattern.permute(1, 2, 0))).save(
        folder / f"{name}_pattern.png"
    )
    spec = {"kind": "mask", "target": trigger.target, "mask": f"{name}_mask.png", "pattern": f"{name}_pattern.png"}
    out = folder / f"{name}.json"
    out.write_text(json.dumps(spec, indent=2))
    return out


def savable(triggers: list[Trigger]) -> list[Trigger]:
    """The triggers a trigger file can hold as found: mask triggers and warps (what trigger-free mode writes)."""
    return [t for t in triggers if isinstance(t, MaskTrigger) or hasattr(t, "to_file")]


def save_triggers(triggers: list[Trigger], folder: str | Path) -> list[Path]:
    """Write the savable ones of `triggers` to `folder` as class<target>-<i>.json (a mask trigger with its PNGs, a
    warp as its own kind) and return the JSON paths."""
    folder, paths = Path(folder), []
    for i, trig in enumerate(savable(triggers)):
        name = f"class{trig.target}-{i}"
        if isinstance(trig, MaskTrigger):
            paths.append(save_mask_trigger(trig, folder, name))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{name}.json")
        paths[-1].write_text(json.dumps(trig.to_file(), indent=2))
    return paths


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return (t.clamp(0, 1).numpy() * 255).round().astype(np.uint8)

