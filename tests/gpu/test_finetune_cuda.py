"""RepQ fine-tuning on a CUDA GPU against the same fine-tune on the CPU; skips without a GPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_repq import _digits_finetune_setup


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: compares a fine-tune on CUDA with the same one on the CPU")
def test_a_finetune_on_cuda_follows_the_cpu_one_and_exports(tmp_path):
    """The same 4-bit RepQ-BNEst fine-tune (seeded batches, BN frozen half-way) on the CPU and on CUDA, in
    float32 without TF32: the same losses step by step and the same learned steps and weights, within what
    float summation order moves (a rounding boundary crossed now and then), and the CUDA model exports."""
    from repq.engines.onnxruntime import OrtEngine
    from repq.quant.finetune import export_quantized, finetune

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        settings = dict(epochs=0.4, lr=0.05, recalibrate_bn=2, freeze_bn_at=0.5, log=lambda _: None)
        on_cpu, loader = _digits_finetune_setup()
        on_cuda = copy.deepcopy(on_cpu).cuda()
        cpu_losses = finetune(on_cpu, loader, **settings)
        cuda_losses = finetune(on_cuda, loader, **settings)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert len(cuda_losses) == len(cpu_losses) == 10
    assert cuda_losses[0] == pytest.approx(cpu_losses[0], rel=2e-3)  # the same batch; MinError may pick a neighbour
    assert cuda_losses == pytest.approx(cpu_losses, rel=3e-2)
    assert all(p.is_cuda for p in on_cuda.parameters())
    cpu_state, cuda_state = on_cpu.state_dict(), on_cuda.state_dict()
    for name in ("step", "weight"):
        keys = [k for k in cpu_state if k.endswith(name) and cpu_state[k].is_floating_point()]
        got = torch.cat([cuda_state[k].cpu().flatten() for k in keys])
        want = torch.cat([cpu_state[k].flatten() for k in keys])
        assert (got - want).norm() <= 3e-2 * want.norm(), name

    images = next(iter(loader))[0][:8].numpy()
    shape = (1, *images.shape[1:])
    from_cuda = export_quantized(on_cuda, tmp_path / "cuda.onnx", "onnxruntime", shape, dynamic_batch=True)
    from_cpu = export_quantized(copy.deepcopy(on_cuda).cpu(), tmp_path / "cpu.onnx", "onnxruntime", shape,
                                dynamic_batch=True)
    np.testing.assert_array_equal(OrtEngine(from_cuda)(images), OrtEngine(from_cpu)(images))
