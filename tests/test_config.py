"""TrainConfig: bad settings fail before any model work, and the GPU presets."""

import pytest
import torch

import kontext_helpers as kh


def test_bad_configs_fail_before_model_work(one_pair, train_config, tmp_path):
    data = one_pair()
    cases = {"resolution": dict(resolution=100), "rank": dict(rank=0), "steps": dict(steps=-1),
             "resolution 128": dict(resolution=128), "l2_form": dict(l2_form="l1")}
    for expected, kw in cases.items():
        with pytest.raises(ValueError, match=expected.split()[0]):
            kh.train(None, data, train_config(tmp_path, **kw), progress=False)  # pipe=None: no model work may happen
    with pytest.raises(ValueError, match="unknown GPU preset"):
        kh.TrainConfig.for_gpu("v100-max")


def test_gpu_presets():
    cpu = kh.TrainConfig.for_gpu("auto") if not torch.cuda.is_available() else kh.TrainConfig.for_gpu("cpu")
    assert cpu.mixed_precision == "no" and cpu.quantize_base is None, "CPU preset: fp32, no quantisation"
    t4 = kh.TrainConfig.for_gpu("t4", steps=10)
    assert t4.mixed_precision == "fp16" and t4.quantize_base == "nf4" and t4.steps == 10, "T4: fp16, NF4, override"
    for name, preset in kh.GPU_PRESETS.items():
        assert preset["peak_memory_source"], f"preset {name} must say whether its memory figure is measured"
