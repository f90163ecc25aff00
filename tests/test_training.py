"""Training: the loop learns, keeps the base frozen, batches, samples sigmas, stops on NaN, previews, precision."""

import dataclasses

import pytest
import torch

import kontext_helpers as kh


def test_training_lowers_the_fixed_evaluation_loss(fresh_pipe, one_pair, train_config, tmp_path):
    pipe = fresh_pipe
    data = one_pair()
    cfg = train_config(tmp_path, steps=300, rank=16, lora_targets="attn_ff")
    cache = kh.build_train_cache(pipe, data, max_sequence_length=32, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        untrained_region = kh.make_region_module(cfg.region_kind, cache.h_tok, cache.w_tok, 64)  # train()'s start
    before = kh.evaluation_loss(pipe, untrained_region, cache)  # an untrained depth module adds nothing
    result = kh.train(pipe, data, cfg, cache=cache, progress=False)
    after = kh.evaluation_loss(pipe, result.region, cache, depth_module=result.depth)
    assert after["loss"] <= 0.6 * before["loss"], f"evaluation loss must fall by >= 40%: {before} -> {after}"
    assert after["err_in"] < before["err_in"], f"in-mask error to the target must fall: {before} -> {after}"
    assert after["err_out"] <= before["err_out"] * 1.05, f"out-of-mask error must not grow: {before} -> {after}"
    assert len(result.history) == 300 and {"step", "loss", "loss_in", "loss_out", "lr", "seconds"} <= set(
        result.history[-1]), "history must have one record per step with the documented keys"


def test_only_lora_and_region_are_trained_base_is_bit_identical(fresh_pipe, one_pair, train_config, tmp_path):
    pipe = fresh_pipe
    reference = kh.load_pipeline("tiny", seed=0).transformer.state_dict()
    result = kh.train(pipe, one_pair(), train_config(tmp_path, steps=3), progress=False)
    assert isinstance(result, kh.TrainResult), "train returns a TrainResult"
    for name, p in pipe.transformer.named_parameters():
        if "lora_" in name:
            assert p.requires_grad, f"LoRA parameter {name} must be trainable"
            continue
        assert not p.requires_grad, f"base parameter {name} must stay frozen"
        key = name.replace(".base_layer", "")
        torch.testing.assert_close(p.detach(), reference[key], rtol=0, atol=0,
                                   msg=f"base parameter {name} changed during training")
    lora_b = [p for n, p in kh.collect_lora_named_params(pipe.transformer) if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA B matrices must move away from their zero init"
    assert result.region.kind == kh.DEFAULT_REGION_KIND == kh.TrainConfig().region_kind, (
        "train builds the default region kind")
    assert (result.region.h_tok, result.region.w_tok) == (4, 4), "region module on the training grid (64 px)"
    assert any(p.abs().sum() > 0 for p in result.region.parameters()), "the region module must be trained"


@pytest.mark.parametrize("kind", ["none", "linear", "cells", "marked_context", "marked"])
def test_every_region_kind_trains_checkpoints_and_resumes(fresh_pipe, one_pair, train_config, tmp_path, kind):
    cfg = train_config(tmp_path, steps=2, region_kind=kind, checkpoint_every=1)
    result = kh.train(fresh_pipe, one_pair(), cfg, progress=False)
    if kind == "none":
        assert result.region is None, "region_kind='none' trains a LoRA alone"
    else:
        assert result.region.kind == kind, f"train must build a {kind!r} region module, got {result.region.kind!r}"
    ckpt = kh.load_checkpoint(kh.list_checkpoints(cfg.output_dir)[-1][1])
    assert (ckpt["region"] is None) == (kind == "none"), "the checkpoint holds the region module exactly when trained"
    other = "linear" if kind != "linear" else "cells"
    with pytest.raises(ValueError, match="region_kind"):
        kh.train(kh.load_pipeline("tiny"), one_pair(),
                 dataclasses.replace(cfg, steps=3, resume=True, region_kind=other), progress=False)
    resumed = kh.train(kh.load_pipeline("tiny"), one_pair(), dataclasses.replace(cfg, steps=3, resume=True),
                       progress=False)
    assert resumed.resumed_from == 2 and len(resumed.history) == 3, "the same kind resumes where it stopped"


def test_batch_and_accumulation_and_prior_preservation_run(fresh_pipe, one_pair, train_config, tmp_path):
    cfg = train_config(tmp_path, steps=2, batch_size=2, gradient_accumulation_steps=2, preservation="prior",
                       timestep_sampling="logit_normal")
    result = kh.train(fresh_pipe, one_pair(count=3), cfg, progress=False)
    assert [r["step"] for r in result.history] == [1, 2], "one history record per optimizer update"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history), "losses must be finite"


def test_prior_preservation_outside_term_is_zero_for_an_untrained_lora(fresh_pipe, one_pair, train_config, tmp_path):
    pipe = fresh_pipe
    data = one_pair()
    cache = kh.build_train_cache(pipe, data, max_sequence_length=32, progress=False)
    kh.add_lora(pipe.transformer, rank=4)  # lora_B starts at zero: LoRA on == LoRA off
    noise = torch.randn(1, cache.h_tok * cache.w_tok, 64)
    _, parts = kh.training_loss(pipe.transformer, None, cache.batch([0]), cache.txt_ids, cache.h_tok, cache.w_tok,
                                noise, torch.tensor([0.5]), train_config(tmp_path, preservation="prior"))
    assert parts["loss_out"] < 1e-10, f"prior target equals the prediction of an untrained LoRA: {parts}"


def test_decoupled_l2_shrinks_each_lora_weight_by_lr_times_lambda_per_step(one_pair, train_config, tmp_path):
    """AdamW's decoupled decay: p <- p (1 - lr * lambda) before the Adam step. At the first update B is 0, so the
    loss gives A no gradient: A moves by the decay alone, and B (from 0) the same with and without it."""
    data, lam, lr = one_pair(), 0.5, 1e-3
    lora = {}
    for form, lora_lambda in (("decoupled", lam), ("mean_square", 0.0)):
        pipe = kh.load_pipeline("tiny", seed=0)
        cfg = train_config(tmp_path / form, steps=1, learning_rate=lr, l2_form=form, l2_lora_lambda=lora_lambda)
        kh.train(pipe, data, cfg, progress=False)
        lora[form] = {n: p.detach().clone() for n, p in kh.collect_lora_named_params(pipe.transformer)}
    assert cfg.weight_decays(True, True) == [0.0, 0.0, 0.0], "without the decoupled form nothing decays"
    assert dataclasses.replace(cfg, l2_form="decoupled", l2_lora_lambda=lam).weight_decays(True, False)[0] == lam, (
        "the decoupled form decays the LoRA group by its lambda")
    for name, p in lora["mean_square"].items():
        shrink = (1 - lr * lam) if ".lora_A." in name else 1.0
        torch.testing.assert_close(lora["decoupled"][name], p * shrink, rtol=1e-6, atol=1e-9,
                                   msg=f"{name}: one decoupled step scales it by 1 - lr * lambda (A) or not at all (B)")


def test_a_resumed_run_takes_the_configs_weight_decay(fresh_pipe, one_pair, train_config, tmp_path):
    cfg = train_config(tmp_path, steps=1, checkpoint_every=1)
    kh.train(fresh_pipe, one_pair(), cfg, progress=False)
    more = dataclasses.replace(cfg, steps=2, resume=True, l2_form="decoupled", l2_lora_lambda=0.3)
    kh.train(kh.load_pipeline("tiny", seed=0), one_pair(), more, progress=False)
    groups = kh.load_checkpoint(kh.list_checkpoints(cfg.output_dir)[-1][1])["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == more.weight_decays(True, True) == [0.3, cfg.l2_region_lambda, 0.0], (
        f"the resumed optimizer must decay as the new config says, not as the checkpoint saved: {groups}")


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


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(fresh_pipe, one_pair, train_config, tmp_path,
                                                            monkeypatch):
    real = kh.fm_masked_dual_loss_with_l2
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), parts

    monkeypatch.setattr(kh.training, "fm_masked_dual_loss_with_l2", flaky)  # the name train() calls
    with pytest.raises(FloatingPointError, match=r"step 3.*step-000002"):
        kh.train(fresh_pipe, one_pair(), train_config(tmp_path, steps=5, checkpoint_every=2), progress=False)
    assert [s for s, _ in kh.list_checkpoints(str(tmp_path / "run"))] == [2], "the last good checkpoint stays"


def test_previews_are_written_and_reported(fresh_pipe, one_pair, train_config, tmp_path):
    records = []
    cfg = train_config(tmp_path, steps=2, preview_every=2, preview_steps=2)
    kh.train(fresh_pipe, one_pair(), cfg, callback=records.append, progress=False)
    previews = [r["preview"] for r in records if "preview" in r]
    assert previews == [str(tmp_path / "run" / "previews" / "step-000002.png")], f"one preview at step 2: {records}"
    from PIL import Image

    with Image.open(previews[0]) as im:
        width, height = im.size
    assert width > 3 * height, f"the preview shows context | mask | depth | target | result | change: {im.size}"


def test_previews_can_edit_a_held_out_pair(fresh_pipe, one_pair, train_config, tmp_path):
    held = kh.DrawnPairs(7, 1, 64)[0]
    cfg = train_config(tmp_path, steps=1, preview_every=1, preview_steps=2)
    records = []
    kh.train(fresh_pipe, one_pair(), cfg, callback=records.append, progress=False, preview_pair=held)
    held_png = [r["preview"] for r in records if "preview" in r][0]
    other = train_config(tmp_path / "b", steps=1, preview_every=1, preview_steps=2)
    records = []
    kh.train(kh.load_pipeline("tiny", seed=0), one_pair(), other, callback=records.append, progress=False)
    own_png = [r["preview"] for r in records if "preview" in r][0]
    from PIL import Image

    with Image.open(held_png) as a, Image.open(own_png) as b:
        assert a.size == b.size and a.tobytes() != b.tobytes(), (
            "the held-out pair's preview must show that pair, not the dataset's first")


def test_gradient_checkpointing_gives_the_same_training(one_pair, train_config, tmp_path):
    runs = {}
    for flag in (False, True):
        cfg = train_config(tmp_path / str(flag), steps=2, gradient_checkpointing=flag)
        runs[flag] = kh.train(kh.load_pipeline("tiny", seed=0), one_pair(), cfg, progress=False).history
    for a, b in zip(runs[False], runs[True]):
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6,
                                   msg="gradient checkpointing must not change the maths")


def test_bf16_mixed_precision_runs_with_fp32_lora(fresh_pipe, one_pair, train_config, tmp_path):
    pipe = fresh_pipe
    result = kh.train(pipe, one_pair(), train_config(tmp_path, steps=2, mixed_precision="bf16"), progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history), "bf16 losses must be finite"
    dtypes = {p.dtype for _, p in kh.collect_lora_named_params(pipe.transformer)}
    assert dtypes == {torch.float32}, f"trainable LoRA weights must stay float32 under autocast, got {dtypes}"


def test_training_without_depth_on_a_pipeline_with_an_ip_adapter(fresh_pipe, one_pair, train_config, tmp_path):
    pipe = fresh_pipe
    assert pipe.transformer.encoder_hid_proj is not None, "the tiny pipeline carries an IP-Adapter"
    result = kh.train(pipe, one_pair(), train_config(tmp_path, steps=2, use_depth=False), progress=False)
    assert len(result.history) == 2, "use_depth=False must train with the adapter contributing nothing"


def test_after_bf16_training_the_pipeline_equals_a_fresh_one_with_the_saved_adapter(fresh_pipe, one_pair,
                                                                                    train_config, tmp_path):
    pipe, data = fresh_pipe, one_pair()
    result = kh.train(pipe, data, train_config(tmp_path, steps=2, mixed_precision="bf16"), progress=False)
    assert "_original_forward" not in vars(pipe.transformer), "train must remove accelerate's autocast wrapper"
    kh.save_adapter(pipe, result.region, str(tmp_path / "adapter"), depth_module=result.depth)
    fresh = kh.load_pipeline("tiny", seed=0)
    region = kh.load_adapter(fresh, str(tmp_path / "adapter"))
    depth_module = kh.load_depth_module(str(tmp_path / "adapter"), fresh)
    item = data[0]

    def edit(p, r, d):
        return kh.sample_edit(p, item["context"], item["prompt"], mask=item["mask"], region=r, depth=item["depth"],
                              depth_module=d, num_inference_steps=3, output_type="latent", max_sequence_length=32,
                              generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(edit(pipe, result.region, result.depth), edit(fresh, region, depth_module), rtol=0,
                               atol=0, msg="after train the pipeline must equal a fresh one with the saved adapter")


def _tensorboard_events(folder):
    """Every scalar series and image tag TensorBoard finds under ``folder`` (its own reader, all events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    images = {tag: [(e.step, e.width, e.height) for e in events.Images(tag)] for tag in tags["images"]}
    return scalars, images


def test_tensorboard_gets_every_loss_part_lr_and_the_previews(fresh_pipe, one_pair, train_config, tmp_path):
    cfg = train_config(tmp_path, steps=3, preview_every=2, preview_steps=2, report_to="tensorboard",
                       tracker_project="trial")
    records = []
    result = kh.train(fresh_pipe, one_pair(), cfg, callback=records.append, progress=False)
    scalars, images = _tensorboard_events(tmp_path / "run" / "logs" / "trial")
    for key, tag in (("loss", "loss/total"), ("loss_in", "loss/in_mask"), ("loss_out", "loss/outside"),
                     ("l2_lora", "loss/l2_lora"), ("l2_region", "loss/l2_region"), ("lr", "lr")):
        logged = scalars.get(tag)
        assert logged is not None, f"{tag} is not logged; logged: {sorted(scalars)}"
        assert [s for s, _ in logged] == [1, 2, 3], f"{tag}: one value per update, at its step: {logged}"
        torch.testing.assert_close(torch.tensor([v for _, v in logged]),
                                   torch.tensor([r[key] for r in result.history]),
                                   msg=f"{tag} must be the history's {key}")
    from PIL import Image

    preview = [r["preview"] for r in records if "preview" in r][0]
    with Image.open(preview) as im:
        size = im.size
    assert images.get("preview") == [(2, *size)], f"the step-2 preview, at its size {size}: {images}"


def test_tracker_settings_are_checked_before_any_model_work(fresh_pipe, one_pair, train_config, tmp_path):
    with pytest.raises(ValueError, match="report_to='mlflow'.*tensorboard"):
        kh.train(fresh_pipe, one_pair(), train_config(tmp_path, report_to="mlflow"), progress=False)
    with pytest.raises(ValueError, match="tracker_project='a/b'"):
        kh.train(fresh_pipe, one_pair(), train_config(tmp_path, tracker_project="a/b"), progress=False)
    from accelerate import Accelerator

    plain = Accelerator(cpu=True)
    with pytest.raises(ValueError, match=r"Accelerator\(log_with='tensorboard'"):
        kh.train(fresh_pipe, one_pair(), train_config(tmp_path, report_to="tensorboard"), accelerator=plain,
                 progress=False)
    assert not (tmp_path / "run" / "logs").exists(), "no tracker files when the settings are refused"
    assert getattr(fresh_pipe.transformer, "peft_config", None) is None, "refused before a LoRA was attached"


def test_a_missing_tracker_package_is_named(fresh_pipe, one_pair, train_config, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(ImportError, match="pip install wandb"):
        kh.train(fresh_pipe, one_pair(), train_config(tmp_path, report_to="wandb"), progress=False)


def test_a_wandb_style_tracker_gets_the_records_and_each_preview(fresh_pipe, one_pair, train_config, tmp_path,
                                                                monkeypatch):
    import accelerate.utils
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class WandbStandIn(GeneralTracker):  # wandb's tracker interface, offline: records every call
        name = "wandb"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.calls = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.calls.append(("settings", values))

        def log(self, values, step=None, **kwargs):
            self.calls.append(("log", step, values))

        def log_images(self, values, step=None, **kwargs):
            self.calls.append(("images", step, values))

        def finish(self):
            self.calls.append(("finish",))

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    stand_in = WandbStandIn()
    cfg = train_config(tmp_path, steps=2, preview_every=2, preview_steps=2, report_to="wandb")
    result = kh.train(fresh_pipe, one_pair(), cfg, accelerator=Accelerator(cpu=True, log_with=[stand_in]),
                      progress=False)
    kinds = [c[0] for c in stand_in.calls]
    assert kinds == ["settings", "log", "log", "images", "finish"], f"settings, two updates, a preview: {kinds}"
    assert stand_in.calls[0][1]["report_to"] == "wandb" and stand_in.calls[0][1]["alpha"] == "None", (
        "every setting goes to the tracker as a plain value")
    assert stand_in.calls[2][1:] == (2, {"loss/total": result.history[1]["loss"],
                                         "loss/in_mask": result.history[1]["loss_in"],
                                         "loss/outside": result.history[1]["loss_out"],
                                         "loss/l2_lora": result.history[1]["l2_lora"],
                                         "loss/l2_region": result.history[1]["l2_region"],
                                         "lr": result.history[1]["lr"]}), f"step 2's record: {stand_in.calls[2]}"
    step, images = stand_in.calls[3][1:]
    assert step == 2 and len(images["preview"]) == 1 and images["preview"][0].shape[2] == 3, (
        "one RGB preview [H, W, 3] in a list, as wandb's tracker takes it")
