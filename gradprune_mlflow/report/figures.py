"""The sanitize run's figures as PIL images: the pruning curve, filters pruned per layer, and triggers.

Matplotlib's Agg canvas without pyplot: no global backend switch, safe in threads, servers and flows.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.triggers import Trigger


def curve_png(curve: list[dict[str, Any]]):
    """The pruning curve as a PIL image: validation clean accuracy and unlearning loss against filters pruned."""
    fig = _figure(6, 3.5)
    x = [p.get("pruned", p.get("step")) for p in curve]
    ax = fig.add_subplot()
    ax.plot(x, [p.get("val_clean_accuracy") for p in curve], "o-", color="tab:blue", label="val clean accuracy")
    ax.set_xlabel("filters pruned")
    ax.set_ylabel("validation clean accuracy", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(x, [p.get("val_unlearning_loss") for p in curve], "s--", color="tab:red", label="val unlearning loss")
    ax2.set_ylabel("validation unlearning loss", color="tab:red")
    ax.set_title("Grad-Prune pruning curve")
    fig.tight_layout()
    return to_pil(fig)


def pruned_by_layer_png(report: dict[str, Any]):
    """Filters pruned per conv layer (report['pruned_by_layer']) as a horizontal bar chart, or None when none were."""
    by_layer = report.get("pruned_by_layer") or {}
    if not by_layer:
        return None
    names = list(by_layer)
    fig = _figure(6, 0.9 + 0.35 * len(names))
    ax = fig.add_subplot()
    bars = ax.barh(names, [by_layer[n] for n in names], color="tab:purple")
    ax.bar_label(bars, fontsize=8)
    ax.invert_yaxis()  # layers top to bottom in network order
    ax.set_xlabel("filters pruned")
    ax.set_title(f"Filters pruned per layer ({report.get('pruned_filters', '?')} of "
                 f"{report.get('total_filters', '?')})")
    fig.tight_layout()
    return to_pil(fig)


def triggers_png(triggers, clean_set: CleanSet | None = None):
    """One row per synthesized trigger: its mask and its pattern (a warp: how far it moves each pixel, white at the
    largest shift, and a checkerboard warped), and (with a clean set) a clean image with it applied."""
    cols = 3 if clean_set is not None and len(clean_set) else 2
    h, w = clean_set.images.shape[-2:] if cols == 3 else (32, 32)
    fig = _figure(2.2 * cols, 2.2 * len(triggers))
    for row, trig in enumerate(triggers):
        if hasattr(trig, "shift_map"):
            shift = trig.shift_map(h, w)
            board = ((torch.arange(h)[:, None] // 4 + torch.arange(w)[None] // 4) % 2).float()[None, None]
            panels = [("shift", shift / shift.max().clamp_min(1e-6)), ("warped grid", trig.apply(board)[0])]
        else:
            panels = [("mask", trig.mask), ("pattern", trig.pattern)]
        if cols == 3:
            panels.append(("applied", trig.apply(clean_set.images[:1])[0]))
        for col, (title, t) in enumerate(panels):
            _show(fig.add_subplot(len(triggers), cols, row * cols + col + 1), t, f"class {trig.target}: {title}")
    fig.tight_layout()
    return to_pil(fig)


def trigger_comparison_png(shown: list[tuple[str, Trigger]], image: torch.Tensor):
    """The synthesized trigger beside the real one: per (label, trigger), one clean image with the trigger applied
    and where it changes the image (|x' - x|, brightest where it changes most). Works for every trigger kind."""
    fig = _figure(4.4, 2.3 * len(shown))
    x = image[None].float()
    for row, (label, trig) in enumerate(shown):
        applied = trig.apply(x)[0]
        change = (applied - x[0]).abs().amax(0)
        change = change / change.max().clamp_min(1e-6)
        _show(fig.add_subplot(len(shown), 2, 2 * row + 1), applied, f"{label}: applied")
        _show(fig.add_subplot(len(shown), 2, 2 * row + 2), change, f"{label}: change")
    fig.tight_layout()
    return to_pil(fig)


def _show(ax, t: torch.Tensor, title: str) -> None:
    img = t.detach().cpu().float()
    img = img.mean(0) if img.ndim == 3 and img.shape[0] != 3 else img
    ax.imshow(img.permute(1, 2, 0).numpy() if img.ndim == 3 else img.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def to_pil(fig):
    """Render a matplotlib figure to an RGB PIL image."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
