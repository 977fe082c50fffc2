"""SIG (Barni et al., "A New Backdoor Attack in CNNs by Training Set Corruption Without Label Poisoning").

An additive horizontal sinusoid, x' = clip(x + delta * sin(2 pi j f / W)); the defense's SignalTrigger draws it. The
paper's attack is clean-label: only images of the target class carry the signal, and no label changes, so the model
learns the signal as a feature of that class. The lab has it both ways: "signal" poisons other classes and relabels
them, "sig-clean-label" poisons the target class only.
"""

from __future__ import annotations

from gradprune_mlflow.defense.triggers import SignalTrigger


def sig(target: int = 0, delta: float = 0.12, frequency: float = 6) -> SignalTrigger:
    """The lab's SIG trigger: amplitude `delta`, `frequency` periods across the image."""
    return SignalTrigger(target, delta=delta, frequency=frequency)
