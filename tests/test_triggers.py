"""Trigger files and what each kind does to [0, 1] pixels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gradprune_mlflow.defense.trigger_files import savable, save_mask_trigger, save_triggers
from gradprune_mlflow.defense.triggers import (
    BlendTrigger,
    PatchTrigger,
    SignalTrigger,
    check_trigger_fits,
    load_trigger,
    trigger_from_dict,
)
from gradprune_mlflow.defense.warp import FlowTrigger
from gradprune_mlflow.errors import TriggerError
from gradprune_mlflow.report.figures import triggers_png


def images(n=4, c=1, h=28, w=28, seed=0):
    # Strictly inside (0, 1) so that a pixel set to exactly 1 cannot be mistaken for an untouched one.
    return torch.rand((n, c, h, w), generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05


def from_file(folder, spec):
    """Write spec as folder/t.json and load it the way the CLI does."""
    (folder / "t.json").write_text(json.dumps(spec))
    return load_trigger(folder / "t.json")


@pytest.mark.parametrize(
    ("location", "rows", "cols"),
    [
        ("bottom-right", slice(25, 28), slice(25, 28)),
        ("bottom-left", slice(25, 28), slice(0, 3)),
        ("top-right", slice(0, 3), slice(25, 28)),
        ("top-left", slice(0, 3), slice(0, 3)),
        ("center", slice(12, 15), slice(12, 15)),
    ],
)
def test_patch_sets_exactly_its_square_to_one(tmp_path, location, rows, cols):
    trig = from_file(tmp_path, {"kind": "patch", "target": 0, "size": 3, "location": location})
    x = images(c=3)
    before = x.clone()
    out = trig.apply(x)
    inside = torch.zeros(28, 28, dtype=torch.bool)
    inside[rows, cols] = True
    assert torch.equal(out[..., inside], torch.ones_like(out[..., inside]))
    assert torch.equal(out[..., ~inside], x[..., ~inside])
    assert torch.equal(x, before), "apply must not change its input"


def test_patch_margin_moves_it_off_the_edge():
    out = PatchTrigger(1, size=2, location="bottom-right", margin=1).apply(images())
    assert torch.equal(out[0, 0, 25:27, 25:27], torch.ones(2, 2))
    assert (out[0, 0, 27, :] < 1).all() and (out[0, 0, :, 27] < 1).all()


def test_blend_mixes_the_seeded_noise_with_alpha():
    x = images(c=3)
    out = trigger_from_dict({"kind": "blend", "target": 2, "alpha": 0.2, "pattern": "noise", "seed": 7}).apply(x)
    pattern = torch.rand((3, 28, 28), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, 0.8 * x + 0.2 * pattern)
    other_seed = BlendTrigger(2, alpha=0.2, seed=8).apply(x)
    assert not torch.allclose(out, other_seed)


def test_blend_with_a_png_pattern(tmp_path):
    pattern = np.zeros((28, 28), np.uint8)
    pattern[:, ::2] = 255
    Image.fromarray(pattern).save(tmp_path / "stripes.png")
    trig = from_file(tmp_path, {"kind": "blend", "target": 0, "alpha": 0.5, "pattern": "stripes.png"})
    x = images()
    expected = 0.5 * x + 0.5 * torch.from_numpy(pattern / 255.0).float()
    torch.testing.assert_close(trig.apply(x), expected)


def test_mask_from_pngs_broadcasts_a_grey_pattern_over_rgb(tmp_path):
    mask = np.zeros((28, 28), np.uint8)
    mask[2:6, 3:8] = 255
    mask[10, 10] = 128  # grey: half strength
    pattern = np.full((28, 28), 51, np.uint8)  # 0.2
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(pattern).save(tmp_path / "p.png")
    trig = from_file(tmp_path, {"kind": "mask", "target": 3, "mask": "m.png", "pattern": "p.png"})
    x = images(c=3)
    out = trig.apply(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, :, 2:6, 3:8], torch.full_like(out[:, :, 2:6, 3:8], 0.2))
    m = 128 / 255
    torch.testing.assert_close(out[:, :, 10, 10], (1 - m) * x[:, :, 10, 10] + m * 0.2)
    untouched = torch.ones(28, 28, dtype=torch.bool)
    untouched[2:6, 3:8] = False
    untouched[10, 10] = False
    assert torch.equal(out[..., untouched], x[..., untouched])


def test_mask_png_is_resized_to_the_image(tmp_path):
    Image.fromarray(np.full((56, 56), 255, np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((56, 56), np.uint8)).save(tmp_path / "p.png")
    trig = trigger_from_dict({"kind": "mask", "target": 0, "mask": "m.png", "pattern": "p.png"}, base=tmp_path)
    assert torch.equal(trig.apply(images()), torch.zeros(4, 1, 28, 28))


def test_signal_adds_a_horizontal_sinusoid():
    trig = trigger_from_dict({"kind": "signal", "target": 0, "delta": 0.08, "frequency": 6})
    x = torch.full((2, 1, 28, 28), 0.5)
    out = trig.apply(x)
    cols = torch.arange(28, dtype=torch.float32)
    wave = 0.08 * torch.sin(2 * math.pi * cols * 6 / 28)
    torch.testing.assert_close(out[0, 0], (0.5 + wave).expand(28, 28))
    assert torch.equal(out[:, :, 0], out[:, :, 27]), "every row carries the same wave"


def test_signal_stays_in_pixel_range():
    out = SignalTrigger(0, delta=0.5, frequency=3).apply(torch.cat([torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)]))
    assert out.min() >= 0 and out.max() <= 1
    assert out[0].max() > 0 and out[1].min() < 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"kind": "laser", "target": 0}', "is not one of"),
        ('{"kind": "patch"}', "target"),
        ('{"kind": "patch", "target": -1}', "target"),
        ('{"kind": "patch", "target": true}', "target"),
        ('{"kind": "patch", "target": "0"}', "target"),
        ('{"kind": "patch", "target": 0, "colour": "red"}', "unknown key"),
        ('{"kind": "patch", "target": 0, "location": "middle"}', "location"),
        ('{"kind": "patch", "target": 0, "size": 0}', "size"),
        ('{"kind": "blend", "target": 0, "alpha": 0}', "alpha"),
        ('{"kind": "blend", "target": 0, "alpha": "much"}', "blend"),
        ('{"kind": "mask", "target": 0, "mask": "m.png"}', "needs 'mask' and 'pattern'"),
        ('{"kind": "signal", "target": 0, "delta": 2}', "delta"),
        ('{"kind": "signal", "target": 0, "frequency": 0}', "frequency"),
    ],
)
def test_malformed_trigger_files_raise_trigger_error(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(TriggerError, match=message):
        load_trigger(path)


def test_missing_trigger_file(tmp_path):
    with pytest.raises(TriggerError, match="does not exist"):
        load_trigger(tmp_path / "nope.json")


def test_unreadable_pattern_png_fails_when_applied(tmp_path):
    (tmp_path / "m.png").write_bytes(b"not a png at all")
    trig = from_file(tmp_path, {"kind": "mask", "target": 0, "mask": "m.png", "pattern": "m.png"})
    with pytest.raises(TriggerError, match="cannot read trigger image"):
        trig.apply(images())


def test_check_trigger_fits_rejects_targets_and_sizes_outside_the_data():
    with pytest.raises(TriggerError, match="not a class"):
        check_trigger_fits(PatchTrigger(10), 10, (1, 28, 28))
    with pytest.raises(TriggerError, match="does not fit"):
        check_trigger_fits(PatchTrigger(0, size=30), 10, (1, 28, 28))
    check_trigger_fits(PatchTrigger(9), 10, (1, 28, 28))


def test_saved_mask_trigger_reloads_identically(tmp_path):
    patch = PatchTrigger(4, size=4, location="top-left").build((1, 28, 28))
    reloaded = load_trigger(save_mask_trigger(patch, tmp_path / "saved"))
    x = images()
    assert reloaded.target == 4
    assert torch.equal(reloaded.apply(x), patch.apply(x))


def test_a_synthesized_warp_is_written_as_a_warp_trigger_file_and_reads_back_as_the_same_warp(tmp_path):
    field = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3))
    warp = FlowTrigger(6, field, 1.5)
    (path,) = save_triggers([warp], tmp_path / "saved")
    assert path.name == "class6-0.json"
    spec = json.loads(path.read_text())
    assert (spec["kind"], spec["target"], spec["strength"]) == ("warp", 6, 1.5)
    assert max(abs(v) for axis in spec["displacement"] for row in axis for v in row) <= 1.0
    reloaded = load_trigger(path)
    x = images(c=3, h=32, w=32)
    assert reloaded.target == 6
    assert torch.allclose(reloaded.apply(x), warp.apply(x), atol=1e-4)
    assert not torch.allclose(warp.apply(x), x, atol=1e-3)  # it does move pixels
    assert savable([warp, BlendTrigger(0, alpha=0.2), PatchTrigger(0).build((1, 28, 28))])[0] is warp


@pytest.mark.parametrize(("spec", "message"), [
    ({"kind": "warp", "target": 0}, "needs 'displacement'"),
    ({"kind": "warp", "target": 0, "displacement": [[0.0, 0.0], [0.0, 0.0]]}, r"shaped \[2\]\[G\]\[G\]"),
    ({"kind": "warp", "target": 0, "displacement": [[[2.0] * 2] * 2] * 2}, r"in \[-1, 1\]"),
    ({"kind": "warp", "target": 0, "displacement": "left"}, "nested lists"),
    ({"kind": "warp", "target": 0, "displacement": [[[0.0] * 2] * 2] * 2, "strength": 0}, "strength"),
])
def test_a_bad_warp_trigger_file_names_what_is_wrong(spec, message):
    with pytest.raises(TriggerError, match=message):
        trigger_from_dict(spec)


def test_the_trigger_figure_shows_a_warp_as_its_shift_and_a_warped_grid():
    warp = FlowTrigger(2, torch.full((2, 4, 4), 50.0))  # tanh saturates: the bound everywhere
    assert float(warp.shift_map(28, 28).max()) == pytest.approx(2 ** 0.5, abs=1e-3)  # one pixel along each axis
    image = triggers_png([warp, PatchTrigger(0).build((1, 28, 28))])
    assert image.size[0] == image.size[1] > 0  # two rows of two panels
