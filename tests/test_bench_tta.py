"""bench/train_cifar.py's test-time views, against views built by hand."""

import importlib.util
from pathlib import Path

import torch

SPEC = importlib.util.spec_from_file_location("train_cifar", Path(__file__).parents[1] / "bench" / "train_cifar.py")
train_cifar = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(train_cifar)


class FirstRow(torch.nn.Module):
    """Logits = the first pixel row of channel 0: every view's logits can be written down by hand."""

    def forward(self, x):
        return x[:, 0, 0, :]


def test_views_are_the_image_its_mirror_and_reflect_padded_one_pixel_shifts():
    torch.manual_seed(0)
    images = torch.randn(3, 2, 6, 10)
    row0, row1 = images[:, 0, 0, :], images[:, 0, 1, :]
    soft = lambda logits: logits.softmax(1)  # noqa: E731
    single = soft(row0)
    flip = single + soft(row0.flip(-1))
    # content moved down-right: row 0 is image row 1 (reflected), columns [x1, x0, x1, ..., x_{W-2}]
    moved_down_right = torch.cat([row1[:, 1:2], row1[:, :-1]], dim=1)
    # content moved up-left: row 0 is image row 1, columns [x1, ..., x_{W-1}, x_{W-2}]
    moved_up_left = torch.cat([row1[:, 1:], row1[:, -2:-1]], dim=1)
    shifts = sum(soft(v) + soft(v.flip(-1)) for v in (moved_down_right, moved_up_left))
    views = train_cifar.tta_probabilities(FirstRow(), images)
    assert tuple(views) == train_cifar.TTA_VIEWS
    torch.testing.assert_close(views["single"], single)
    torch.testing.assert_close(views["flip"], flip)
    torch.testing.assert_close(views["flip+shift"], flip + 0.5 * shifts)
