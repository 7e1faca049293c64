"""Full-precision training settings as validated data (no torch import: the recipe and `repq --help` read it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """How to train: the `repq train` flags and the recipe's `stages.train` section both come from this."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("repvgg_a0", description="zoo model (`repq models`)")
    width_mult: float | None = Field(None, gt=0, description="model width multiplier; None keeps the model's")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra create_model arguments")
    convert: Literal["acb", "dbb", "orepa", "repvgg", "plain"] | None = Field(
        None, description="re-parametrize the model's kxk conv+BN pairs into these blocks (convert_convs)")
    epochs: int = Field(10, ge=1)
    low_res: int | None = Field(None, ge=8, description="progressive resizing: the first low_res_epochs train on "
                                "inputs resized to this many pixels (cheaper epochs); later ones at full size")
    low_res_epochs: int = Field(0, ge=0)
    batch_size: int = Field(128, ge=1, description="global batch, split over the processes")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="learning rate for the global batch")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, description="never applied to BN parameters or biases")
    l2: Literal["plain", "custom"] = Field(
        "plain", description="custom: RepVGG's L2 on the merged kernel of RepVGG blocks; plain: QARepVGG's M1"
    )
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 autocasts on the CPU too"
    )
    channels_last: bool | None = Field(None, description="NHWC memory format; None: yes (faster on GPUs and CPUs)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu or cuda[:N]")
    seed: int = 0
    split_seed: int = Field(0, description="seed of the val split carved from train/ (kept apart from seed)")
    preset: Literal["auto", "cifar", "imagenet", "digits"] = "auto"
    val_size: float = Field(0.1, gt=0, description="val split when there is no val/: a fraction or a count")
    num_workers: int = Field(0, ge=0)
    sync_bn: bool = Field(True, description="BatchNorm statistics over all processes' batches")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (quick probes)")
    keep_every: int | None = Field(None, ge=1, description="also keep DIR/epoch_NNN.pt every this many epochs "
                                   "(to follow a quantity along training)")
    progress: bool = True

    @model_validator(mode="after")
    def _full_size_last(self) -> TrainConfig:
        if self.low_res_epochs and self.low_res is None:
            raise ValueError("low_res_epochs needs low_res (the input size of those epochs)")
        if self.low_res_epochs >= self.epochs:
            raise ValueError(f"low_res_epochs ({self.low_res_epochs}) must leave full-size epochs of the "
                             f"{self.epochs}: evaluation and deployment run at full size")
        return self


class SubstituteConfig(BaseModel):
    """RepVGG blocks -> QARepVGG blocks, then training with plain L2 (the QARepVGG paper's M1); every other
    training setting is the FP training's."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(6, ge=1, description="training of the substituted model (its post-BN starts fresh)")
    lr: float = Field(0.05, gt=0)
