"""Smoke test of the bundled example trainer: a few real SimCLR steps on digits."""
import math
import re

import pytest

from fastssl.examples import train

pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")


def test_simclr_digits_runs_and_prints_finite_losses(capsys):
    train.main(["--steps", "3", "--batch-size", "32"])
    out = capsys.readouterr().out
    losses = [float(v) for v in re.findall(r"step +\d+  loss ([0-9.]+)", out)]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    accuracies = re.findall(r"kNN-5 accuracy ([0-9.]+)% \(same encoder at random init: ([0-9.]+)%\)", out)
    assert len(accuracies) == 1
    assert all(0 < float(a) <= 100 for a in accuracies[0])
