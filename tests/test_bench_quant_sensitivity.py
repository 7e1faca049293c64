"""bench/quant_sensitivity.py's kernel range statistics, against values worked out by hand."""

import importlib.util
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location(
    "quant_sensitivity", Path(__file__).parents[1] / "bench" / "quant_sensitivity.py")
quant_sensitivity = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(quant_sensitivity)


def test_an_identity_centre_tap_sets_the_range_and_small_taps_round_to_zero():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.01)  # 17 small taps per output channel
        conv.weight[0, 0, 1, 1] = conv.weight[1, 1, 1, 1] = 1.0  # the identity's centre tap
    (row,) = quant_sensitivity.kernel_ranges(torch.nn.Sequential(conv), bits=4)
    rms = ((1.0 + 17 * 0.01**2) / 18) ** 0.5
    assert row["peak_over_rms"] == pytest.approx(1.0 / rms, rel=1e-5)
    assert row["off_centre_peak_over_peak"] == pytest.approx(0.01, rel=1e-5)
    # 4 bits: step 1/7; every 0.01 tap rounds to 0, the centre tap is exact
    assert row["rounding_error_over_rms"] == pytest.approx((17 * 0.01**2 / 18) ** 0.5 / rms, rel=1e-5)
