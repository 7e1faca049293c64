"""Input presets: CIFAR-style 32x32, ImageNet-style 224x224, and the embedded digits.

In-memory images are augmented a whole batch at a time from per-image seeds (pad + random crop + flip);
per-file images go through torchvision transforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad: int = 0  # random-crop padding of in-memory training images
    flip: bool = True  # random horizontal flip in training
    in_memory: bool = True  # decode once and keep the uint8 pixels
    resize: int = 0  # eval-time resize before the center crop (ImageNet style)


PRESETS: dict[str, Preset] = {
    "cifar": Preset("cifar", 32, CIFAR_MEAN, CIFAR_STD, pad=4),
    "imagenet": Preset("imagenet", 224, IMAGENET_MEAN, IMAGENET_STD, in_memory=False, resize=256),
    # Digits are not mirror-symmetric: no flips, a small shift only.
    "digits": Preset("digits", 32, (0.2,) * 3, (0.3,) * 3, pad=2, flip=False),
}


def normalize_batch(batch: torch.Tensor, preset: Preset) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32, scaled to [0, 1] and normalized per channel."""
    mean = torch.tensor(preset.mean).view(1, 3, 1, 1)
    std = torch.tensor(preset.std).view(1, 3, 1, 1)
    return (batch.float().div_(255.0) - mean) / std


def augment_batch(batch: torch.Tensor, preset: Preset, seeds: torch.Tensor) -> torch.Tensor:
    """Zero-pad, random-crop back to size and (if the preset flips) mirror: one draw per image seed."""
    n, _, h, w = batch.shape
    pad = preset.pad
    span = 2 * pad + 1
    dy = (seeds % span).tolist()
    dx = ((seeds // span) % span).tolist()
    flip = (((seeds // (span * span)) % 2) == 1).tolist() if preset.flip else [False] * n
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad)) if pad else batch
    out = torch.empty_like(batch)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def file_transform(preset: Preset, train: bool):
    """torchvision transform from a PIL image to a normalized float tensor."""
    from torchvision.transforms import v2

    size = preset.image_size
    flips = [v2.RandomHorizontalFlip()] if preset.flip else []
    if preset.in_memory:  # a small-image preset whose tree was too large to keep in memory
        steps = [v2.Resize((size, size))]
        if train:
            steps += [v2.RandomCrop(size, padding=preset.pad), *flips]
    elif train:
        steps = [v2.RandomResizedCrop(size, antialias=True), *flips]
    else:
        steps = [v2.Resize(preset.resize, antialias=True), v2.CenterCrop(size)]
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(preset.mean, preset.std)]
    return v2.Compose(steps + tail)
