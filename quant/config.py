"""Quantization settings as validated data: PTQ, toolkit QAT and RepQ fine-tuning (no torch import here).

Each model is the one declaration of its operation's settings: `repq ptq|qat|finetune` build their flags from
it, `repq run` builds its recipe sections from it, and the Python functions take it (or its fields as keywords).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from repq.calibration.calibrators import CALIBRATORS, PERCENTILES

INIT_METHODS = ("minerror", "max")
MIN_BITS, MAX_BITS = 2, 8

# RepQ fine-tuning methods: the RepQ wrapper's three modes (BNEst two ways) and the Merged baseline.
FINETUNE_METHODS: dict[str, str] = {
    "repq": "RepQ: QAT through the merged kernel, BN folded with its running statistics",
    "bn": "RepQ-BN (RepQ paper, Algorithm 1): the merge uses each batch's exact BN statistics",
    "bnest_paper": "RepQ-BNEst as the paper writes it: BN statistics estimated by equations 5-6 alone",
    "bnest_corrected": "RepQ-BNEst with each estimate corrected per channel by the exact statistics of the first "
                       "batch (for models trained with ordinary BN)",
    "merged": "Merged baseline: fuse the blocks first, then LSQ QAT on the plain convs",
}
METHOD_LABELS = {"repq": "RepQ", "bn": "RepQ-BN", "bnest_paper": "RepQ-BNEst(paper)",
                 "bnest_corrected": "RepQ-BNEst(corrected)", "merged": "Merged"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PTQConfig(Strict):
    """Post-training quantization with NVIDIA's toolkit (ModelOpt), symmetric INT8 as TensorRT runs it."""

    method: Literal[(*CALIBRATORS, "auto")] = Field("max", description="activation calibrator: "
                                                    + "; ".join(f"{c.name}: {c.description}" for c in
                                                                CALIBRATORS.values())
                                                    + "; auto: the four, and keep the best on check_size held-out "
                                                      "training images")
    percentile: Literal[PERCENTILES] = Field(99.99, description="the percentile calibrator's percentile")
    calib_size: int = Field(512, ge=1, description="calibration images drawn from the training split")
    batch_size: int = Field(64, ge=1, description="calibration batch")
    fuse: bool = Field(True, description="quantize the deploy form (blocks fused); false: the training form")
    skip_layers: list[str] = Field(default_factory=list, description="Conv/Linear names kept in float")
    check_size: int = Field(256, ge=1, description="method=auto: training images, disjoint from the calibration "
                                                   "draw, that judge the calibrators (the val split is never read)")
    budget: float | None = Field(None, ge=0, description="largest drop (top-1 points, or PSNR dB) of the ONNX "
                                 "Runtime INT8 engine from FP32 on the val split: the layers that hurt most are "
                                 "kept in float, fewest first, until it holds (none: quantize every layer)")
    rank_by: Literal["output_error", "accuracy"] = Field(
        "output_error", description="budget: the order layers are tried in: output_error (each layer quantized "
        "alone, its model's output error on the calibration images; one forward pass a layer) or accuracy (the "
        "val top-1/PSNR drop of each layer quantized alone, fake-quant; one val evaluation a layer)")
    seed: int = Field(0, description="seed of the calibration draw")
    progress: bool = True


DOCTOR_ENGINES = ("tensorrt", "onnxruntime", "openvino")  # quant.doctor.ENGINE_RUNS' keys


class DoctorConfig(Strict):
    """The doctor: per layer of the deploy form, why symmetric INT8 loses accuracy, and where each engine's
    QDQ file parts ways with the fake-quant model."""

    calib_size: int = Field(64, ge=1, description="calibration images drawn from the training split")
    batch_size: int = Field(32, ge=1, description="calibration batch")
    method: Literal[tuple(CALIBRATORS)] = Field("max", description="activation calibrator")
    percentile: Literal[PERCENTILES] = Field(99.99, description="the percentile calibrator's percentile")
    engines: list[Literal[DOCTOR_ENGINES]] = Field(
        default_factory=lambda: list(DOCTOR_ENGINES), description="QDQ files checked against the fake-quant "
        "model: tensorrt (its file in ONNX Runtime), onnxruntime, openvino (TensorRT's file); none: [] (--no-engine)")
    sqnr_images: int | None = Field(8, ge=1, description="images the per-layer SQNRs are measured on (none: all)")
    seed: int = Field(0, description="seed of the calibration draw (as PTQ's)")
    progress: bool = True


class QATConfig(Strict):
    """Toolkit QAT: fine-tune a PTQ model with its fake quantizers (amax fixed, straight-through rounding)."""

    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0, description="SGD, cosine to 0")
    batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (quick probes)")
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu or cuda[:N]")
    progress: bool = True


class FinetuneConfig(Strict):
    """RepQ fine-tuning: QAT through each re-param block's merged kernel (RepQ paper), or the Merged baseline."""

    method: Literal[tuple(FINETUNE_METHODS)] = Field(
        "bnest_corrected", description="; ".join(f"{k}: {v}" for k, v in FINETUNE_METHODS.items()))
    w_bits: int = Field(8, ge=MIN_BITS, le=MAX_BITS, description="weight bits")
    a_bits: int = Field(8, ge=MIN_BITS, le=MAX_BITS, description="activation bits")
    act_unsigned: bool = Field(False, description="unsigned post-ReLU activation quantizers (simulation only: "
                                                  "TensorRT runs signed INT8)")
    first_last_bits: int | None = Field(8, ge=MIN_BITS, le=MAX_BITS,
                                        description="the first and last layers keep at least these bits")
    epochs: float = Field(1.0, gt=0, description="may be fractional")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (quick probes; in "
                                            "`repq run`, the train stage's when unset)")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, ge=0, description="SGD with momentum 0.9, cosine to 0")
    weight_decay: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="as the FP training used, if any")
    distill: float = Field(0.0, ge=0, le=1, description="weight of the loss against the FP model's outputs "
                                                        "(knowledge distillation)")
    recalibrate_bn: int = Field(0, ge=0, description="batches to re-estimate BN statistics over, after the "
                                                     "last step (or at freeze_bn_at)")
    freeze_bn_at: float | None = Field(None, ge=0, lt=1, description="share of the steps after which BN "
                                       "statistics are recalibrated and frozen: the last steps train the deploy "
                                       "kernel itself")
    init: Literal[INIT_METHODS] = Field("minerror", description="activation step initialisation on the first "
                                                                "batch")
    weight_init: Literal[INIT_METHODS] | None = Field(None, description="weight step initialisation (default: "
                                                                        "max from 4 bits up, minerror below)")
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (CUDA when present), cpu or cuda[:N]")
    save_every: int = Field(500, ge=1, description="steps between resumable states")
    progress: bool = True

    @property
    def label(self) -> str:
        """How reports name this fine-tune: method and bit widths."""
        return f"{METHOD_LABELS[self.method]} W{self.w_bits}A{self.a_bits}"
