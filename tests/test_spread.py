"""The spread square (defense/spread.py) finds a stamp without one target, and its study (benchmarks/spread_probe.py)
prints what it measured."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.patch_probe import plain_squares
from gradprune_mlflow.defense.spread import spread_square
from scripts import benchmark_script

K, SIDE = 10, 8


class CornerBackdoor(nn.Module):
    """Reads the class from a one-hot code in row 0; a white 2x2 square in the bottom-right corner sends class y to
    `send(y)`: (y + 1) mod K for an all-to-all backdoor, one sink class for a clean model's weakness."""

    def __init__(self, send):
        super().__init__()
        self.send = send
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x[:, 0, 0, :K].argmax(1)
        stamped = x[:, 0, -2:, -2:].flatten(1).min(1).values > 0.99
        y = torch.where(stamped, self.send(y), y)
        return nn.functional.one_hot(y, K).float()


def coded(n: int = 40) -> Split:
    labels = torch.arange(n) % K
    images = torch.full((n, 1, SIDE, 16), 0.5)
    images[torch.arange(n), 0, 0, labels] = 1.0
    images[..., -2:, -2:] = 0.5
    return Split(images, labels)


def test_the_squares_cover_the_last_rows_and_columns():
    squares = {(top, left, side) for _, _, top, left, side in plain_squares((1, 8, 16), (2, 3))}
    assert (6, 14, 2) in squares and (5, 13, 3) in squares and (0, 0, 2) in squares
    assert all(top + side <= 8 and left + side <= 16 for top, left, side in squares)


def test_an_all_to_all_square_spreads_and_a_sink_does_not():
    data = coded()
    spread = spread_square(CornerBackdoor(lambda y: (y + 1) % K), data, K, target=3, sides=(2,))
    assert spread.window == (6, 14, 2) and spread.fill == "white"
    # every image moved, each class to its own: all but the two largest destinations' images count
    assert spread.moved == 1.0 and spread.spread == pytest.approx(0.8)
    assert spread.destinations == [4] * K
    # its trigger is the square itself, named for the unlearning plan
    stamped = spread.trigger.apply(data.images)
    assert spread.trigger.target == 3 and spread.trigger.source == "spread-white"
    assert torch.equal(CornerBackdoor(lambda y: (y + 1) % K)(stamped).argmax(1), (data.labels + 1) % K)
    assert torch.equal(stamped[..., :-2, :], data.images[..., :-2, :])
    sink = spread_square(CornerBackdoor(lambda y: torch.full_like(y, 8)), data, K, target=3, sides=(2,))
    assert sink.spread == 0.0  # whatever a square moves goes to one or two classes


def test_a_model_that_gets_no_image_right_has_no_spread_square():
    data = coded()
    wrong = Split(data.images, (data.labels + 5) % K)
    assert spread_square(CornerBackdoor(lambda y: y), wrong, K, target=0, sides=(2,)) is None


def test_its_table_reads_the_lines_the_study_wrote(tmp_path, capsys):
    line = {"arch": "small_cnn", "attack": "badnets-all-to-all", "epochs": 10, "seed": 0, "split": "dev",
            "hit": {"spread": 0.275, "moved": 0.407, "fill": "white", "window": {"top": 25, "left": 25, "side": 3},
                    "destinations": [4, 6, 5, 6, 6, 3, 0, 0, 6, 1]}, "seconds": 20.0}
    (tmp_path / "lines.jsonl").write_text(json.dumps(line) + "\n")
    assert benchmark_script("spread_probe").main(["--md", str(tmp_path / "lines.jsonl")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[-1] == ("| small_cnn badnets-all-to-all | 10 | 0 | 27.5% | 40.7% | 25, 25, 3, white "
                        "| 4 6 5 6 6 3 0 0 6 1 |")
