"""Triggers: what turns a clean image into one the backdoor obeys.

Every trigger acts on [0, 1] pixels (N, C, H, W), before the model's normalisation, and most are the general form
x' = (1 - m) * x + m * p with a mask m and a pattern p. Trigger files are JSON (docs/contracts.md, "Trigger files"):

    {"kind": "patch", "target": 0, "size": 3, "location": "bottom-right", "margin": 0}
    {"kind": "blend", "target": 0, "alpha": 0.2, "pattern": "noise", "seed": 0}     (or "pattern": "file.png")
    {"kind": "mask", "target": 0, "mask": "mask.png", "pattern": "pattern.png"}
    {"kind": "signal", "target": 0, "delta": 0.08, "frequency": 6}                    (additive sinusoid, SIG)
    {"kind": "warp", "target": 0, "displacement": [[[...]]], "strength": 1.0}         (a smooth warp, defense/warp.py)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gradprune_mlflow.errors import TriggerError

LOCATIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


class Trigger:
    """Base class: a target class and a function from clean to triggered pixels."""

    kind = "trigger"

    def __init__(self, target: int):
        self.target = int(target)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return triggered copies of x (N, C, H, W) in [0, 1]; x itself is not changed."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The JSON-able description of this trigger (for reports and parameters)."""
        return {"kind": self.kind, "target": self.target}


class MaskTrigger(Trigger):
    """x' = (1 - m) x + m p with fixed tensors m (1|C, H, W) and p (1|C, H, W) in [0, 1]."""

    kind = "mask"

    def __init__(self, target: int, mask: torch.Tensor, pattern: torch.Tensor, source: str = "tensor"):
        super().__init__(target)
        self.mask = mask.float().clamp(0, 1)
        self.pattern = pattern.float().clamp(0, 1)
        self.source = source

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(x.device, x.dtype)
        p = self.pattern.to(x.device, x.dtype)
        return ((1 - m) * x + m * p).clamp(0, 1)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "source": self.source}


class _ShapedTrigger(Trigger):
    """A mask trigger whose m and p depend on the image shape; built once per shape and cached."""

    def __init__(self, target: int):
        super().__init__(target)
        self._cache: dict[tuple, MaskTrigger] = {}

    def build(self, shape: tuple[int, int, int]) -> MaskTrigger:
        """The mask/pattern form of this trigger for images of shape (C, H, W)."""
        shape = tuple(int(s) for s in shape)
        if shape not in self._cache:
            mask, pattern = self._make(shape)
            self._cache[shape] = MaskTrigger(self.target, mask, pattern, source=self.kind)
        return self._cache[shape]

    def _make(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.build(tuple(x.shape[1:])).apply(x)


class PatchTrigger(_ShapedTrigger):
    """A solid square patch (white by default) at a corner or the centre (BadNets)."""

    kind = "patch"

    def __init__(self, target: int, size: int = 3, location: str = "bottom-right", margin: int = 0, value: float = 1.0):
        super().__init__(target)
        if location not in LOCATIONS:
            raise TriggerError(f"patch location {location!r} is not one of {', '.join(LOCATIONS)}")
        if int(size) < 1 or int(margin) < 0 or not 0.0 <= float(value) <= 1.0:
            raise TriggerError("patch needs size >= 1, margin >= 0 and value in [0, 1]")
        self.size, self.location, self.margin, self.value = int(size), location, int(margin), float(value)

    def _make(self, shape):
        c, h, w = shape
        s, g = self.size, self.margin
        if s + g > min(h, w):
            raise TriggerError(f"patch of size {s} with margin {g} does not fit a {h}x{w} image")
        top = {"top": g, "bottom": h - g - s}.get(self.location.split("-")[0], (h - s) // 2)
        left = {"left": g, "right": w - g - s}.get(self.location.split("-")[-1], (w - s) // 2)
        mask = torch.zeros(1, h, w)
        mask[:, top : top + s, left : left + s] = 1.0
        return mask, torch.full((c, h, w), self.value)

    def spec(self):
        return {**super().spec(), "size": self.size, "location": self.location, "margin": self.margin}


class BlendTrigger(_ShapedTrigger):
    """x' = (1 - alpha) x + alpha p over the whole image; p is seeded noise or a PNG (Blended, Chen et al. 2017)."""

    kind = "blend"

    def __init__(
        self, target: int, alpha: float = 0.2, pattern: str = "noise", seed: int = 0, base: Path | None = None
    ):
        super().__init__(target)
        if not 0.0 < float(alpha) <= 1.0:
            raise TriggerError(f"blend alpha must be in (0, 1], got {alpha}")
        self.alpha, self.pattern_name, self.seed, self.base = float(alpha), str(pattern), int(seed), base

    def _make(self, shape):
        c, h, w = shape
        if self.pattern_name == "noise":
            gen = torch.Generator().manual_seed(self.seed)
            pattern = torch.rand((c, h, w), generator=gen)
        else:
            pattern = read_png(_resolve(self.pattern_name, self.base), (h, w), c)
        return torch.full((1, h, w), self.alpha), pattern

    def spec(self):
        return {**super().spec(), "alpha": self.alpha, "pattern": self.pattern_name, "seed": self.seed}


class FileMaskTrigger(_ShapedTrigger):
    """The general form with m and p read from PNGs (m grey 0..255 -> 0..1; p grey is broadcast over channels)."""

    kind = "mask"

    def __init__(self, target: int, mask: str, pattern: str, base: Path | None = None):
        super().__init__(target)
        self.mask_name, self.pattern_name, self.base = mask, pattern, base

    def _make(self, shape):
        c, h, w = shape
        mask = read_png(_resolve(self.mask_name, self.base), (h, w), 1)
        return mask, read_png(_resolve(self.pattern_name, self.base), (h, w), c)

    def spec(self):
        return {**super().spec(), "mask": self.mask_name, "pattern": self.pattern_name}


class SignalTrigger(Trigger):
    """x' = clip(x + delta * sin(2 pi j f / W)): an additive horizontal sinusoid (SIG, Barni et al. 2019)."""

    kind = "signal"

    def __init__(self, target: int, delta: float = 0.08, frequency: float = 6):
        super().__init__(target)
        if not 0.0 < float(delta) <= 1.0 or float(frequency) <= 0:
            raise TriggerError("signal needs 0 < delta <= 1 and frequency > 0")
        self.delta, self.frequency = float(delta), float(frequency)

    def apply(self, x):
        w = x.shape[-1]
        cols = torch.arange(w, device=x.device, dtype=x.dtype)
        wave = self.delta * torch.sin(2 * math.pi * cols * self.frequency / w)
        return (x + wave).clamp(0, 1)

    def spec(self):
        return {**super().spec(), "delta": self.delta, "frequency": self.frequency}


def _resolve(name: str, base: Path | None) -> Path:
    path = Path(name)
    return path if path.is_absolute() or base is None else base / path


def read_png(path: Path, hw: tuple[int, int], channels: int) -> torch.Tensor:
    """Read a PNG as (channels, H, W) floats in [0, 1], resized to hw; grey is broadcast to `channels`."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB") if img.mode not in ("L", "RGB") else img
            if img.size != (hw[1], hw[0]):
                img = img.resize((hw[1], hw[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise TriggerError(f"cannot read trigger image {path}: {exc}; give a readable PNG") from None
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] == channels:
        return t
    if t.shape[0] == 1:
        return t.expand(channels, *hw).clone()
    return t.mean(0, keepdim=True)  # an RGB image asked for as grey


def _warp(target: int, displacement: Any, strength: float = 1.0) -> Trigger:
    from gradprune_mlflow.defense.warp import FlowTrigger  # warp.py builds on this module's Trigger
    return FlowTrigger.from_displacement(target, displacement, strength)


_KINDS = {
    "patch": (PatchTrigger, {"size", "location", "margin", "value"}),
    "blend": (BlendTrigger, {"alpha", "pattern", "seed"}),
    "mask": (FileMaskTrigger, {"mask", "pattern"}),
    "signal": (SignalTrigger, {"delta", "frequency"}),
    "warp": (_warp, {"displacement", "strength"}),
}


def trigger_from_dict(spec: dict[str, Any], base: Path | None = None) -> Trigger:
    """Build a trigger from its JSON form. Raises TriggerError naming what is wrong."""
    if not isinstance(spec, dict):
        raise TriggerError("a trigger must be a JSON object with 'kind' and 'target'")
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise TriggerError(f"trigger kind {kind!r} is not one of {', '.join(_KINDS)}")
    target = spec.get("target")
    if not isinstance(target, int) or isinstance(target, bool) or target < 0:
        raise TriggerError("trigger 'target' must be a non-negative integer class index")
    cls, allowed = _KINDS[kind]
    unknown = set(spec) - allowed - {"kind", "target", "name", "description"}
    if unknown:
        raise TriggerError(f"unknown key(s) {sorted(unknown)} in a {kind} trigger; allowed: {sorted(allowed)}")
    required = {"mask": ("mask", "pattern"), "warp": ("displacement",)}.get(kind, ())
    if not set(required) <= set(spec):
        raise TriggerError(f"a {kind} trigger needs {' and '.join(map(repr, required))}; see README 'Trigger files'")
    kwargs = {k: spec[k] for k in allowed if k in spec}
    if kind in ("blend", "mask"):
        kwargs["base"] = base
    try:
        return cls(target, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TriggerError(f"bad {kind} trigger: {exc}") from None


def load_trigger(path: str | Path) -> Trigger:
    """Read a trigger JSON file; PNG paths inside it are relative to the file. Raises TriggerError."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise TriggerError(f"trigger file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TriggerError(f"trigger file {path} is not valid JSON ({exc}); see README 'Trigger files'") from None
    return trigger_from_dict(spec, base=path.parent)


def check_trigger_fits(trigger: Trigger, num_classes: int, input_shape: tuple[int, int, int]) -> None:
    """Raise TriggerError unless the trigger's target is a class and it applies to images of input_shape."""
    if not 0 <= trigger.target < num_classes:
        raise TriggerError(f"trigger target {trigger.target} is not a class of this data set (0..{num_classes - 1})")
    trigger.apply(torch.zeros(1, *input_shape))
