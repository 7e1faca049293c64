"""Data loaders for training (single or multi-process) and the fixed calibration set used by PTQ and QAT."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from repq.calibration.datasets import ImageData, ImageSet, collate_batch, load_data
from repq.calibration.sr import SRData
from repq.errors import RepqError


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardSampler(Sampler[int]):
    """Every `world`-th index from `rank`, without DistributedSampler's padding: each image counted once."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(
    data: ImageData | SRData,
    batch_size: int,
    *,
    seed: int = 0,
    num_workers: int = 0,
    eval_batch_size: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders; `batch_size` is the global batch, split evenly over the ranks of a group.

    The train loader shuffles with a DistributedSampler (also in one process, so that N processes see exactly
    the batches one process would see) and drops the last partial batch; call `set_loader_epoch(loader, e)` at
    each epoch. The val loader gives each rank a disjoint shard in order: summed counts cover each image once.
    For super-resolution data the val "loader" is its SRValidation: whole images of different sizes, one per
    batch, the same on every rank.
    """
    rank, world = _world()
    if batch_size % world:
        raise RepqError(f"batch size {batch_size} does not split over {world} processes: "
                        f"use a multiple of {world}")
    per_rank = batch_size // world
    if len(data.train) < batch_size:
        raise RepqError(f"the training split has {len(data.train)} images, fewer than one batch of "
                        f"{batch_size}: use a batch size of at most {len(data.train)} (the batch_size setting)")
    common = {"num_workers": num_workers, "collate_fn": collate_batch, "persistent_workers": False}
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    train = DataLoader(data.train, batch_size=per_rank, sampler=sampler, drop_last=True, **common)
    if isinstance(data, SRData):
        return train, data.val
    val_sampler = ShardSampler(len(data.val), rank, world)
    val_batch = eval_batch_size or max(per_rank, 256)
    val = DataLoader(data.val, batch_size=val_batch, sampler=val_sampler, **common)
    return train, val


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed shuffling and augmentation for `epoch` (the same on every rank, and again after a resume)."""
    sampler, dataset = getattr(loader, "sampler", None), getattr(loader, "dataset", None)  # any iterable: no-op
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):  # ImageSet, SRPatches: augmentation seeded per epoch
        dataset.set_epoch(epoch)


def calibration_indices(data: ImageData, num_images: int, seed: int = 0) -> np.ndarray:
    """Positions in the training split of the calibration images: a seeded draw, the same on every run."""
    if not 0 < num_images <= len(data.train):
        raise RepqError(f"a calibration set of {num_images} images cannot be drawn from {len(data.train)} "
                        f"training images: choose 1..{len(data.train)}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(len(data.train), generator=generator)[:num_images].sort().values.numpy()


def calibration_set(
    data: ImageData | SRData | str = "digits", num_images: int = 512, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_images` training images (eval transform, no augmentation) and their labels, drawn with `seed`.

    `data` is an `ImageData` or a spec for `load_data` (`digits` or an ImageFolder path, default settings).
    """
    if isinstance(data, SRData):  # low-resolution patches (and their targets), no flips
        return data.train.fixed(num_images, seed)
    data = load_data(data) if not isinstance(data, ImageData) else data
    positions = calibration_indices(data, num_images, seed)
    plain = ImageSet(data.train.source, data.train.indices, data.preset, train=False, seed=data.train.seed)
    chunks = np.array_split(positions, -(-len(positions) // 256))
    batches = [plain.__getitems__(chunk) for chunk in chunks]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def calibration_loader(
    data: ImageData | SRData | str = "digits", num_images: int = 512, batch_size: int = 64, seed: int = 0
) -> DataLoader:
    """The calibration set as batches of (images, labels), in a fixed order."""
    images, labels = calibration_set(data, num_images, seed)
    return DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def calibration_check_loader(data: ImageData, num_calibration: int, num_images: int, batch_size: int = 64,
                             seed: int = 0) -> DataLoader:
    """``num_images`` training images disjoint from the calibration draw of ``num_calibration`` (the same seeded
    permutation, the images after it): what judges calibrators against each other (method=auto), so the val
    split a result is reported on is never read to choose it."""
    if isinstance(data, SRData):
        raise RepqError("method=auto judges calibrators by top-1 on held-out training images: choose a method "
                        "for a super-resolution model (max, entropy, percentile or mse)")
    if num_images < 1 or num_calibration + num_images > len(data.train):
        raise RepqError(f"{num_calibration} calibration + {num_images} check images do not fit the "
                        f"{len(data.train)} training images: calibrate on fewer images, or choose a method")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=generator)
    positions = order[num_calibration:num_calibration + num_images].sort().values.numpy()
    plain = ImageSet(data.train.source, data.train.indices, data.preset, train=False, seed=data.train.seed)
    batches = [plain.__getitems__(chunk) for chunk in np.array_split(positions, -(-len(positions) // 256))]
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def val_subset(data: ImageData, num_images: int, batch_size: int = 256, seed: int = 0) -> DataLoader:
    """A seeded random draw of `num_images` validation images (eval transform), in a fixed order: a quicker
    score than the whole split, whose first images would be a few classes only (it runs class by class)."""
    if num_images < 1:
        raise RepqError(f"a validation subset of {num_images} images is empty: ask for at least one image")
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(len(data.val), generator=generator)[:num_images].tolist()
    return DataLoader(data.val, batch_size=batch_size, sampler=positions, collate_fn=collate_batch)
