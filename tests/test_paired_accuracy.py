"""The paired comparison of a classifier's accuracy on accelerated and dense images of the same seeds."""

from __future__ import annotations

import math

import pytest
import torch

from dit_accel.bench.metrics import paired_accuracy


def test_hand_computed_case() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4])
    reference = torch.tensor([0, 1, 9, 9, 4])  # right on 0, 1, 4
    predicted = torch.tensor([0, 7, 2, 3, 4])  # right on 0, 2, 3, 4
    result = paired_accuracy(predicted, reference, labels)
    assert result.accuracy == pytest.approx(0.8) and result.reference_accuracy == pytest.approx(0.6)
    assert result.difference == pytest.approx(0.2)
    d = [0.0, -1.0, 1.0, 1.0, 0.0]  # per image: right - reference right
    mean = sum(d) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    assert result.standard_error == pytest.approx(std / math.sqrt(5))
    assert result.agreement == pytest.approx(0.4)  # images 0 and 4 get the same class


def test_identical_predictions_differ_by_nothing_with_no_uncertainty() -> None:
    labels = torch.arange(10) % 3
    predicted = torch.tensor([0, 1, 1, 0, 2, 2, 0, 1, 0, 0])
    result = paired_accuracy(predicted, predicted.clone(), labels)
    assert result.difference == 0.0 and result.standard_error == 0.0 and result.agreement == 1.0
    assert result.accuracy == result.reference_accuracy == pytest.approx(0.7)


def test_one_image_has_no_standard_error() -> None:
    result = paired_accuracy(torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))
    assert (result.difference, result.standard_error, result.agreement) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("lengths", [(3, 3, 2), (0, 0, 0), (2, 3, 3)])
def test_mismatched_or_empty_inputs_are_refused(lengths) -> None:
    with pytest.raises(ValueError, match="one length"):
        paired_accuracy(*(torch.zeros(n, dtype=torch.long) for n in lengths))
