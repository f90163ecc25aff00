"""The training engine: learning, frozen base, caching, checkpoints and resume, accelerate, bad configs."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import kontext_helpers as kh

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_samples")
REPO = os.path.dirname(ROOT)


class OnePair(torch.utils.data.Dataset):
    """The first pair of the sample dataset, at a small resolution."""

    def __init__(self, resolution=64, count=1):
        full = kh.KontextPairs(ROOT, resolution=resolution)
        self.resolution = resolution
        self.items = [full[i] for i in range(count)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _config(tmp_path, **kw):
    base = dict(resolution=64, steps=4, rank=4, learning_rate=3e-3, region_learning_rate=1e-2,
                max_sequence_length=32, checkpoint_every=0, output_dir=str(tmp_path / "run"))
    base.update(kw)
    return kh.TrainConfig(**base)


def test_training_lowers_the_fixed_evaluation_loss(tmp_path):
    pipe = kh.load_pipeline("tiny", seed=0)
    data = OnePair()
    cfg = _config(tmp_path, steps=300, rank=16, lora_targets="attn_ff")
    cache = kh.build_train_cache(pipe, data, max_sequence_length=32, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        untrained_region = kh.MaskRegionToken(cache.h_tok, cache.w_tok, 64)  # what train() starts from
    before = kh.evaluation_loss(pipe, untrained_region, cache)
    result = kh.train(pipe, data, cfg, cache=cache, progress=False)
    after = kh.evaluation_loss(pipe, result.region, cache)
    assert after["loss"] <= 0.6 * before["loss"], f"evaluation loss must fall by >= 40%: {before} -> {after}"
    assert after["err_in"] < before["err_in"], f"in-mask error to the target must fall: {before} -> {after}"
    assert after["err_out"] <= before["err_out"] * 1.05, f"out-of-mask error must not grow: {before} -> {after}"
    assert len(result.history) == 300 and {"step", "loss", "loss_in", "loss_out", "lr", "seconds"} <= set(
        result.history[-1]), "history must have one record per step with the documented keys"


def test_only_lora_and_region_are_trained_base_is_bit_identical(tmp_path):
    pipe = kh.load_pipeline("tiny", seed=0)
    reference = kh.load_pipeline("tiny", seed=0).transformer.state_dict()
    result = kh.train(pipe, OnePair(), _config(tmp_path, steps=3), progress=False)
    assert isinstance(result, kh.TrainResult), "train returns a TrainResult"
    for name, p in pipe.transformer.named_parameters():
        if "lora_" in name:
            assert p.requires_grad, f"LoRA parameter {name} must be trainable"
            continue
        assert not p.requires_grad, f"base parameter {name} must stay frozen"
        key = name.replace(".base_layer", "")
        assert torch.equal(p.detach(), reference[key]), f"base parameter {name} changed during training"
    lora_b = [p for n, p in kh.collect_lora_named_params(pipe.transformer) if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA B matrices must move away from their zero init"
    fresh = kh.MaskRegionToken(result.region.h_tok, result.region.w_tok, 64)
    assert result.region.proj.weight.shape == fresh.proj.weight.shape, "region module on the training grid"


def test_cached_step_equals_uncached_step(tmp_path):
    pipe = kh.load_pipeline("tiny", seed=0)
    data = OnePair()
    cfg = _config(tmp_path)
    cache = kh.build_train_cache(pipe, data, max_sequence_length=32, progress=False)
    assert isinstance(cache, kh.TrainCache), "build_train_cache returns a TrainCache"
    region = kh.MaskRegionToken(cache.h_tok, cache.w_tok, 64)
    g = torch.Generator().manual_seed(0)
    noise, sigma = torch.randn(1, cache.h_tok * cache.w_tok, 64, generator=g), torch.tensor([0.37])
    cached, _ = kh.training_loss(pipe.transformer, region, cache.batch([0]), cache.txt_ids, cache.h_tok, cache.w_tok,
                                 noise, sigma, cfg)
    item = data[0]  # everything encoded again, inline, as the seed did at every step
    pe, pooled, txt_ids = kh.encode_prompts(pipe, item["prompt"], max_sequence_length=32)
    ctx_tok, (h, w) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(item["context"][None]), pipe.vae))
    tgt_tok, _ = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(item["target"][None]), pipe.vae))
    m = kh.mask_to_token_grid(item["mask"][None], h, w)
    ip = kh.encode_depth_for_ip_adapter(pipe, kh.depth_to_pil(item["depth"]))
    s = sigma[:, None, None]
    pred = kh.kontext_forward(pipe.transformer, (1 - s) * tgt_tok + s * noise, ctx_tok, region(m), sigma=sigma,
                              prompt_embeds=pe, pooled_prompt_embeds=pooled, txt_ids=txt_ids, h_tok=h, w_tok=w,
                              guidance=cfg.guidance, ip_adapter_image_embeds=ip)
    uncached = kh.fm_masked_dual_loss_with_l2(pred, tgt_tok, ctx_tok, noise, m, h, w, region_token_module=region)
    torch.testing.assert_close(cached, uncached, msg="a cached step must equal the uncached step")


def test_batch_and_accumulation_and_prior_preservation_run(tmp_path):
    pipe = kh.load_pipeline("tiny", seed=0)
    cfg = _config(tmp_path, steps=2, batch_size=2, gradient_accumulation_steps=2, preservation="prior",
                  timestep_sampling="logit_normal")
    result = kh.train(pipe, OnePair(count=3), cfg, progress=False)
    assert [r["step"] for r in result.history] == [1, 2], "one history record per optimizer update"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history), "losses must be finite"


def test_prior_preservation_outside_term_is_zero_for_an_untrained_lora(tmp_path):
    pipe = kh.load_pipeline("tiny", seed=0)
    data = OnePair()
    cache = kh.build_train_cache(pipe, data, max_sequence_length=32, progress=False)
    kh.add_lora(pipe.transformer, rank=4)  # lora_B starts at zero: LoRA on == LoRA off
    noise = torch.randn(1, cache.h_tok * cache.w_tok, 64)
    _, parts = kh.training_loss(pipe.transformer, None, cache.batch([0]), cache.txt_ids, cache.h_tok, cache.w_tok,
                                noise, torch.tensor([0.5]), _config(tmp_path, preservation="prior"))
    assert parts["loss_out"] < 1e-10, f"prior target equals the prediction of an untrained LoRA: {parts}"


def test_sigmas_never_hit_zero_and_stay_in_range():
    for sampling in ("uniform", "logit_normal"):
        s = kh.sample_sigmas(10000, kh.TrainConfig(timestep_sampling=sampling), torch.Generator().manual_seed(0))
        assert s.min() > 0 and s.max() <= 1, f"{sampling}: sigmas must lie in (0, 1], got [{s.min()}, {s.max()}]"
    from diffusers.training_utils import compute_density_for_timestep_sampling

    cfg = kh.TrainConfig(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    ours = kh.sample_sigmas(64, cfg, torch.Generator().manual_seed(3))
    u = compute_density_for_timestep_sampling("logit_normal", 64, 0.5, 0.8, generator=torch.Generator().manual_seed(3))
    expected = (1000 - (u * 1000).long().clamp(0, 999)).float() / 1000
    torch.testing.assert_close(ours, expected, msg="logit-normal sigmas come from diffusers' own density")


def test_bad_configs_fail_before_model_work(tmp_path):
    data = OnePair()
    cases = {"resolution": dict(resolution=100), "rank": dict(rank=0), "steps": dict(steps=-1),
             "resolution 128": dict(resolution=128)}
    for expected, kw in cases.items():
        with pytest.raises(ValueError, match=expected.split()[0]):
            kh.train(None, data, _config(tmp_path, **kw), progress=False)  # pipe=None: no model work may happen
    with pytest.raises(ValueError, match="unknown GPU preset"):
        kh.TrainConfig.for_gpu("v100-max")


def test_gpu_presets():
    cpu = kh.TrainConfig.for_gpu("auto") if not torch.cuda.is_available() else kh.TrainConfig.for_gpu("cpu")
    assert cpu.mixed_precision == "no" and cpu.quantize_base is None, "CPU preset: fp32, no quantisation"
    t4 = kh.TrainConfig.for_gpu("t4", steps=10)
    assert t4.mixed_precision == "fp16" and t4.quantize_base == "nf4" and t4.steps == 10, "T4: fp16, NF4, override"
    for name, preset in kh.GPU_PRESETS.items():
        assert preset["peak_memory_source"], f"preset {name} must say whether its memory figure is measured"


def _lora_and_region(ckpt_dir):
    return tuple(load_file(os.path.join(ckpt_dir, f"{part}.safetensors")) for part in ("lora", "region"))


def _run_worker(out, steps, kill_at=None):
    cmd = [sys.executable, os.path.join(REPO, "tests", "train_worker.py"), str(out), str(steps)]
    cmd += [str(kill_at)] if kill_at else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    straight = _run_worker(tmp_path / "straight", 6)
    assert straight.returncode == 0, f"uninterrupted run failed: {straight.stderr[-2000:]}"
    killed = _run_worker(tmp_path / "killed", 6, kill_at=5)
    assert killed.returncode == -9, f"the run must die by SIGKILL at step 5, got {killed.returncode}"
    steps = [s for s, _ in kh.list_checkpoints(str(tmp_path / "killed"))]
    assert steps == [2, 4], f"checkpoints 2 and 4 must exist after the kill, found {steps}"
    resumed = _run_worker(tmp_path / "killed", 6)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, f"resume failed: {resumed.stderr[-2000:]}"
    (s1, p1), (s2, p2) = kh.list_checkpoints(str(tmp_path / "straight"))[-1], kh.list_checkpoints(
        str(tmp_path / "killed"))[-1]
    assert s1 == s2 == 6, "both runs must end at step 6"
    for a, b, what in zip(_lora_and_region(p1), _lora_and_region(p2), ("LoRA", "region")):
        assert a.keys() == b.keys(), f"{what} checkpoints hold different tensors"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{what} tensor {k} differs between resumed and uninterrupted run"
    assert len(kh.list_checkpoints(str(tmp_path / "straight"))) == 2, "keep_checkpoints=2 keeps the newest two"


def test_half_written_checkpoints_are_ignored(tmp_path):
    pipe = kh.load_pipeline("tiny", seed=0)
    cfg = _config(tmp_path, steps=2, checkpoint_every=2)
    kh.train(pipe, OnePair(), cfg, progress=False)
    root = tmp_path / "run" / "checkpoints"
    (root / "step-000009").mkdir()  # a folder without state.json: killed while writing
    (root / "step-000009" / "lora.safetensors").write_bytes(b"truncated")
    (root / ".tmp-step-000010-123").mkdir()
    assert [s for s, _ in kh.list_checkpoints(str(tmp_path / "run"))] == [2], "only complete checkpoints count"
    result = kh.train(kh.load_pipeline("tiny", seed=0), OnePair(), _config(tmp_path, steps=3, checkpoint_every=2,
                                                                           resume=True), progress=False)
    assert result.resumed_from == 2, "resume must pick the newest complete checkpoint"


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    pipe = kh.load_pipeline("tiny", seed=0)
    real = kh.fm_masked_dual_loss_with_l2
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), parts

    monkeypatch.setattr(kh.training, "fm_masked_dual_loss_with_l2", flaky)  # the name train() calls
    with pytest.raises(FloatingPointError, match=r"step 3.*step-000002"):
        kh.train(pipe, OnePair(), _config(tmp_path, steps=5, checkpoint_every=2), progress=False)
    assert [s for s, _ in kh.list_checkpoints(str(tmp_path / "run"))] == [2], "the last good checkpoint stays"


def test_cli_under_accelerate_launch_two_cpu_processes(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m",
           "kontext_helpers", "train", "--data", ROOT, "--out", str(out), "--resolution", "64", "--steps", "3",
           "--rank", "4", "--max-sequence-length", "32", "--checkpoint-every", "3"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "done: 3 steps" in proc.stdout, f"the CLI must report its steps: {proc.stdout[-1000:]}"
    assert [s for s, _ in kh.list_checkpoints(str(out))] == [3], "the main process writes the final checkpoint"


def test_previews_are_written_and_reported(tmp_path):
    records = []
    cfg = _config(tmp_path, steps=2, preview_every=2, preview_steps=2)
    kh.train(kh.load_pipeline("tiny", seed=0), OnePair(), cfg, callback=records.append, progress=False)
    previews = [r["preview"] for r in records if "preview" in r]
    assert previews == [str(tmp_path / "run" / "previews" / "step-000002.png")], f"one preview at step 2: {records}"
    assert os.path.getsize(previews[0]) > 0, "the preview image must be written"


def test_live_loss_plot_collects_and_draws():
    plot = kh.LiveLossPlot(every=1000)
    for step in range(1, 6):
        plot({"step": step, "loss": 1.0 / step, "loss_in": 0.5 / step, "loss_out": 0.5 / step})
    plot({"step": 5, "preview": "x.png"})  # preview records are not loss records
    fig = plot.figure()
    assert len(plot.records) == 5, "only loss records are collected"
    assert len(fig.axes[0].lines) == 3, "total, in-mask and out-of-mask curves"


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    runs = {}
    for flag in (False, True):
        cfg = _config(tmp_path / str(flag), steps=2, gradient_checkpointing=flag)
        runs[flag] = kh.train(kh.load_pipeline("tiny", seed=0), OnePair(), cfg, progress=False).history
    for a, b in zip(runs[False], runs[True]):
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6,
                                   msg="gradient checkpointing must not change the maths")


def test_bf16_mixed_precision_runs_with_fp32_lora(tmp_path):
    pipe = kh.load_pipeline("tiny", seed=0)
    result = kh.train(pipe, OnePair(), _config(tmp_path, steps=2, mixed_precision="bf16"), progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history), "bf16 losses must be finite"
    dtypes = {p.dtype for _, p in kh.collect_lora_named_params(pipe.transformer)}
    assert dtypes == {torch.float32}, f"trainable LoRA weights must stay float32 under autocast, got {dtypes}"


def test_training_without_depth_on_a_pipeline_with_an_ip_adapter(tmp_path):
    pipe = kh.load_pipeline("tiny", seed=0)
    assert pipe.transformer.encoder_hid_proj is not None, "the tiny pipeline carries an IP-Adapter"
    result = kh.train(pipe, OnePair(), _config(tmp_path, steps=2, use_depth=False), progress=False)
    assert len(result.history) == 2, "use_depth=False must train with the adapter contributing nothing"


class NoModelWork(torch.utils.data.Dataset):
    """A dataset that fails loudly if anything reads it: proves a check came before any model work."""

    def __init__(self, resolution=64):
        self.resolution = resolution

    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise AssertionError("the dataset was read: the config check must come before caching")


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A 2-step run with a checkpoint at step 2 (rank 4, 64 px): what the resume tests resume from."""
    out = tmp_path_factory.mktemp("resume")
    cfg = kh.TrainConfig(resolution=64, steps=2, rank=4, learning_rate=3e-3, region_learning_rate=1e-2,
                         max_sequence_length=32, checkpoint_every=2, output_dir=str(out / "run"))
    kh.train(kh.load_pipeline("tiny", seed=0), OnePair(), cfg, progress=False)
    return cfg


@pytest.mark.parametrize(("change", "named"), [
    ({"rank": 8}, "rank: 4 -> 8"),
    ({"resolution": 128}, "resolution: 64 -> 128"),
    ({"lora_targets": "attn_ff"}, "lora_targets: 'attn' -> 'attn_ff'"),
    ({"rank": 8, "alpha": 2.0}, "alpha: None -> 2.0"),
])
def test_resume_with_weight_shaping_changes_fails_before_model_work(checkpointed_run, change, named):
    cfg = dataclasses.replace(checkpointed_run, steps=4, resume=True, **change)
    with pytest.raises(ValueError, match="cannot resume"):
        kh.checkpoint_to_resume(cfg)  # reads only the checkpoint's state.json
    with pytest.raises(ValueError, match="cannot resume") as err:
        kh.train(kh.load_pipeline("tiny", seed=0), NoModelWork(cfg.resolution), cfg, progress=False)
    assert named in str(err.value), f"the error must name each differing field ({named!r}): {err.value}"
    for name in change:
        assert name in str(err.value), f"the error must name {name}: {err.value}"


def test_resume_accepts_new_steps_and_learning_rate_and_says_so(checkpointed_run, tmp_path, capsys):
    out = shutil.copytree(checkpointed_run.output_dir, tmp_path / "run")  # resume a copy: the fixture stays as is
    cfg = dataclasses.replace(checkpointed_run, steps=3, learning_rate=1e-3, checkpoint_every=3, resume=True,
                              output_dir=str(out))
    result = kh.train(kh.load_pipeline("tiny", seed=0), OnePair(), cfg, progress=False)
    out = capsys.readouterr().out
    assert "learning_rate: 0.003 -> 0.001" in out and "steps: 2 -> 3" in out, f"the run must say what changed: {out}"
    assert result.resumed_from == 2 and len(result.history) == 3, "the run continues from step 2 to step 3"
    assert result.history[-1]["lr"] == pytest.approx(1e-3), "the resumed run uses the new learning rate"


def test_resume_config_changes_sorts_fields_into_blocking_and_accepted():
    saved = kh.TrainConfig(rank=4, steps=10).to_dict()
    current = kh.TrainConfig(rank=8, steps=20, resume=True, output_dir="elsewhere").to_dict()
    blocking, accepted = kh.resume_config_changes(saved, current)
    assert blocking == ["rank: 4 -> 8"], f"rank shapes the weights: {blocking}"
    assert accepted == ["steps: 10 -> 20"], f"steps may change; resume and output_dir are not compared: {accepted}"
    assert set(kh.RESUME_MUST_MATCH) >= {"rank", "alpha", "lora_targets", "lora_ip_adapter", "resolution"}


def test_checkpoint_lora_uses_the_adapter_key_format(checkpointed_run, tmp_path):
    pipe = kh.load_pipeline("tiny", seed=0)
    kh.add_lora(pipe.transformer, rank=4)
    kh.save_adapter(pipe, None, str(tmp_path / "adapter"))
    adapter_keys = {k.removeprefix("transformer.") for k in load_file(str(tmp_path / "adapter" / kh.LORA_WEIGHT_FILE))}
    _, path = kh.list_checkpoints(checkpointed_run.output_dir)[-1]
    ckpt = kh.load_checkpoint(path)
    assert set(ckpt["lora"]) == adapter_keys, "checkpoints and adapters must share PEFT's key format"
    assert ckpt["config"]["rank"] == 4 and ckpt["step"] == 2, "the run's config is saved with the checkpoint"
    assert not os.path.exists(os.path.join(path, "rng.safetensors")), "no RNG file: every draw derives from the seed"


def test_save_and_load_checkpoint_round_trip(tmp_path):
    region = kh.MaskRegionToken(2, 2, 4)
    optimizer = torch.optim.AdamW(region.parameters(), lr=1e-3)
    region(torch.ones(1, 1, 2, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    lora = {"block.lora_A.weight": torch.randn(2, 3)}
    path = kh.save_checkpoint(str(tmp_path), 7, lora_state=lora, region_module=region, optimizer=optimizer,
                              lr_scheduler=scheduler, history=[{"step": 7}], config=kh.TrainConfig(rank=2))
    ckpt = kh.load_checkpoint(path)
    assert ckpt["step"] == 7 and ckpt["config"]["rank"] == 2, "step and config come back"
    torch.testing.assert_close(ckpt["lora"]["block.lora_A.weight"], lora["block.lora_A.weight"], msg="LoRA")
    torch.testing.assert_close(ckpt["region"]["state_dict"]["proj.weight"], region.proj.weight.detach(),
                               msg="region weights come back")
    restored = torch.optim.AdamW(kh.MaskRegionToken(2, 2, 4).parameters(), lr=1e-3)
    restored.load_state_dict(ckpt["optimizer"])
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (restored, optimizer)]
    torch.testing.assert_close(moments[0], moments[1], msg="optimizer moments come back")


def test_a_failed_checkpoint_write_says_so_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def disk_fills_up(tensors, filename, *args, **kwargs):
        if "tmp-step-000004" in str(filename):  # step 2 is written; the disk is full at step 4
            raise OSError(28, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    pipe = kh.load_pipeline("tiny", seed=0)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_up)
    cfg = _config(tmp_path, steps=4, checkpoint_every=2)
    with pytest.raises(kh.CheckpointWriteError) as err:
        kh.train(pipe, OnePair(), cfg, progress=False)
    message = str(err.value)
    root = tmp_path / "run" / "checkpoints"
    assert "step 4" in message and str(root) in message, f"the error names the step and the folder: {message}"
    assert "step 2" in message and "resume=True" in message, f"the error names the checkpoint to resume: {message}"
    assert "No space left on device" in message, f"the cause is kept: {message}"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"], "the temporary folder must be removed"
