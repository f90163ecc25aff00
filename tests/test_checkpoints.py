"""Checkpoints: atomic writes, resume after a kill, resume checks against the saved config, failed writes."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import kontext_helpers as kh


class NoModelWork(torch.utils.data.Dataset):
    """A dataset that fails loudly if anything reads it: proves a check came before any model work."""

    def __init__(self, resolution=64):
        self.resolution = resolution

    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise AssertionError("the dataset was read: the config check must come before caching")


def _lora_region_and_depth(ckpt_dir):
    return tuple(load_file(os.path.join(ckpt_dir, f"{part}.safetensors")) for part in ("lora", "region", "depth"))


@pytest.fixture()
def run_worker(repo_root, subprocess_env):
    """``run_worker(out, steps, kill_at=None)``: ``tests/train_worker.py`` in its own process."""

    def run(out, steps, kill_at=None):
        cmd = [sys.executable, os.path.join(repo_root, "tests", "train_worker.py"), str(out), str(steps)]
        cmd += [str(kill_at)] if kill_at else []
        return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600, env=subprocess_env)

    return run


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, one_pair, train_config):
    """A 2-step run with a checkpoint at step 2 (rank 4, 64 px): what the resume tests resume from."""
    cfg = train_config(tmp_path_factory.mktemp("resume"), steps=2, checkpoint_every=2)
    kh.train(kh.load_pipeline("tiny", seed=0), one_pair(), cfg, progress=False)
    return cfg


def test_killed_run_resumes_to_the_same_weights(run_worker, tmp_path):
    straight = run_worker(tmp_path / "straight", 6)
    assert straight.returncode == 0, f"uninterrupted run failed: {straight.stderr[-2000:]}"
    killed = run_worker(tmp_path / "killed", 6, kill_at=5)
    assert killed.returncode == -9, f"the run must die by SIGKILL at step 5, got {killed.returncode}"
    steps = [s for s, _ in kh.list_checkpoints(str(tmp_path / "killed"))]
    assert steps == [2, 4], f"checkpoints 2 and 4 must exist after the kill, found {steps}"
    resumed = run_worker(tmp_path / "killed", 6)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, f"resume failed: {resumed.stderr[-2000:]}"
    (s1, p1), (s2, p2) = kh.list_checkpoints(str(tmp_path / "straight"))[-1], kh.list_checkpoints(
        str(tmp_path / "killed"))[-1]
    assert s1 == s2 == 6, "both runs must end at step 6"
    # the worker trains at four aspect-ratio buckets, two samples of one bucket a batch, with depth_kind="tokens" and
    # depth dropout 0.3: the bucketed batches and the depth module resume exactly too
    for a, b, what in zip(_lora_region_and_depth(p1), _lora_region_and_depth(p2), ("LoRA", "region", "depth")):
        assert a.keys() == b.keys(), f"{what} checkpoints hold different tensors"
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0,
                                       msg=f"{what} tensor {k} differs between resumed and uninterrupted run")
    depth = _lora_region_and_depth(p2)[2]
    assert depth["proj.weight"].abs().max() > 0, "the depth projection must have moved away from its zero init"
    assert len(kh.list_checkpoints(str(tmp_path / "straight"))) == 2, "keep_checkpoints=2 keeps the newest two"


def test_half_written_checkpoints_are_ignored(fresh_pipe, one_pair, train_config, tmp_path):
    cfg = train_config(tmp_path, steps=2, checkpoint_every=2)
    kh.train(fresh_pipe, one_pair(), cfg, progress=False)
    root = tmp_path / "run" / "checkpoints"
    (root / "step-000009").mkdir()  # a folder without state.json: killed while writing
    (root / "step-000009" / "lora.safetensors").write_bytes(b"truncated")
    (root / ".tmp-step-000010-123").mkdir()
    assert [s for s, _ in kh.list_checkpoints(str(tmp_path / "run"))] == [2], "only complete checkpoints count"
    result = kh.train(kh.load_pipeline("tiny", seed=0), one_pair(),
                      train_config(tmp_path, steps=3, checkpoint_every=2, resume=True), progress=False)
    assert result.resumed_from == 2, "resume must pick the newest complete checkpoint"


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


def test_resume_accepts_new_steps_and_learning_rate_and_says_so(checkpointed_run, one_pair, tmp_path, capsys):
    out = shutil.copytree(checkpointed_run.output_dir, tmp_path / "run")  # resume a copy: the fixture stays as is
    cfg = dataclasses.replace(checkpointed_run, steps=3, learning_rate=1e-3, checkpoint_every=3, resume=True,
                              output_dir=str(out))
    result = kh.train(kh.load_pipeline("tiny", seed=0), one_pair(), cfg, progress=False)
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
    assert set(kh.RESUME_MUST_MATCH) >= {"rank", "alpha", "lora_targets", "lora_ip_adapter", "resolution"}, (
        f"the fields that shape the weights must block a resume: {kh.RESUME_MUST_MATCH}")


def test_checkpoint_lora_uses_the_adapter_key_format(checkpointed_run, fresh_pipe, tmp_path):
    pipe = fresh_pipe
    kh.add_lora(pipe.transformer, rank=4)
    kh.save_adapter(pipe, None, str(tmp_path / "adapter"))
    adapter_keys = {k.removeprefix("transformer.") for k in load_file(str(tmp_path / "adapter" / kh.LORA_WEIGHT_FILE))}
    _, path = kh.list_checkpoints(checkpointed_run.output_dir)[-1]
    ckpt = kh.load_checkpoint(path)
    assert set(ckpt["lora"]) == adapter_keys, "checkpoints and adapters must share PEFT's key format"
    assert ckpt["config"]["rank"] == 4 and ckpt["step"] == 2, "the run's config is saved with the checkpoint"
    assert not os.path.exists(os.path.join(path, "rng.safetensors")), "no RNG file: every draw derives from the seed"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, one_pair, train_config):
    """A 2-step run with checkpoints at steps 1 and 2 (LoRA, region, depth, optimizer): the damaged-file tests'."""
    cfg = train_config(tmp_path_factory.mktemp("two"), steps=2, checkpoint_every=1)
    kh.train(kh.load_pipeline("tiny", seed=0), one_pair(), cfg, progress=False)
    return cfg


@pytest.mark.parametrize("part", ["lora", "region", "depth", "optimizer"])
def test_a_damaged_checkpoint_part_is_named_with_the_checkpoint_to_resume_from(two_checkpoints, damage_file, tmp_path,
                                                                              part):
    out = str(shutil.copytree(two_checkpoints.output_dir, tmp_path / "run"))
    (_, first), (_, last) = kh.list_checkpoints(out)
    file = damage_file(os.path.join(last, f"{part}.safetensors"))
    with pytest.raises(ValueError) as err:
        kh.load_checkpoint(last)
    msg = str(err.value)
    assert f"{file} is damaged" in msg, f"the error must name the damaged file: {msg}"
    assert "Resume from the previous checkpoint" in msg and f"step 1 ({first}" in msg, f"name the one before: {msg}"
    assert f"kh.list_checkpoints({out!r})" in msg, f"the error must say how to list the checkpoints: {msg}"
    pipe = kh.load_pipeline("tiny", seed=0)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cfg = dataclasses.replace(two_checkpoints, steps=3, resume=True, output_dir=out)
    with pytest.raises(ValueError) as resumed:
        kh.train(pipe, NoModelWork(cfg.resolution), cfg, progress=False)  # fails before the dataset is read
    assert str(resumed.value) == msg, f"a resumed run must stop with the same message: {resumed.value}"
    assert not getattr(pipe.transformer, "peft_config", None), "no LoRA may be attached before the check"
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys(), "the failed resume must add or remove no weight"
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=f"the failed resume changed {key}")


def test_following_the_advice_resumes_from_the_previous_checkpoint(two_checkpoints, one_pair, tmp_path):
    out = str(shutil.copytree(two_checkpoints.output_dir, tmp_path / "run"))
    _, last = kh.list_checkpoints(out)[-1]
    with open(os.path.join(last, "optimizer.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=f"move the damaged folder {last} out of"):
        kh.load_checkpoint(last)
    shutil.move(last, tmp_path / "damaged")  # what the message says to do
    cfg = dataclasses.replace(two_checkpoints, steps=2, resume=True, output_dir=out)
    result = kh.train(kh.load_pipeline("tiny", seed=0), one_pair(), cfg, progress=False)
    assert result.resumed_from == 1, f"with the damaged folder moved away the run resumes from step 1: {result}"
    straight = _lora_region_and_depth(kh.list_checkpoints(two_checkpoints.output_dir)[-1][1])
    for ours, theirs in zip(_lora_region_and_depth(kh.list_checkpoints(out)[-1][1]), straight):
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0,
                                       msg=f"resumed from step 1, step 2 must equal the uninterrupted run: {key}")


def test_a_damaged_first_checkpoint_says_a_resumed_run_starts_from_step_0(two_checkpoints, tmp_path):
    out = str(shutil.copytree(two_checkpoints.output_dir, tmp_path / "run"))
    _, first = kh.list_checkpoints(out)[0]
    with open(os.path.join(first, "lora.safetensors"), "r+b") as f:
        f.truncate(0)
    with pytest.raises(ValueError, match="lists no other complete checkpoint, so a run with resume=True then "
                                         "starts from step 0"):
        kh.load_checkpoint(first)


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


def test_8bit_adamw_state_round_trips_through_a_checkpoint(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="8-bit AdamW needs bitsandbytes (a dev dependency on Linux)")

    def lora_like():  # two 4096 x 2 matrices: large enough for 8-bit moments, and they share bitsandbytes' qmaps
        return [torch.nn.Parameter(torch.linspace(-1, 1, 8192).reshape(4096, 2) * k) for k in (1, 2)]

    params = lora_like()
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    sum((p**2).sum() for p in params).backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    path = kh.save_checkpoint(str(tmp_path), 1, lora_state={}, region_module=kh.MaskRegionToken(2, 2, 4),
                              optimizer=optimizer, lr_scheduler=scheduler, history=[],
                              config=kh.TrainConfig(optimizer="adamw8bit"))
    saved = load_file(os.path.join(path, "optimizer.safetensors"))
    assert any(v.dtype == torch.uint8 for v in saved.values()), f"8-bit moments expected, got {sorted(saved)}"
    restored = bnb.optim.AdamW8bit(lora_like(), lr=1e-3)
    restored.load_state_dict(kh.load_checkpoint(path)["optimizer"])
    for i in (0, 1):
        state = optimizer.state_dict()["state"][i]["__bnb_optimizer_quant_state__"]
        back = restored.state_dict()["state"][i]["__bnb_optimizer_quant_state__"]
        for name, value in state.items():
            torch.testing.assert_close(back[name], value, msg=f"parameter {i}: state {name} must come back")


def test_a_failed_checkpoint_write_says_so_and_leaves_no_partial_folder(fresh_pipe, one_pair, train_config, tmp_path,
                                                                       monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def disk_fills_up(tensors, filename, *args, **kwargs):
        if "tmp-step-000004" in str(filename):  # step 2 is written; the disk is full at step 4
            raise OSError(28, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_up)
    cfg = train_config(tmp_path, steps=4, checkpoint_every=2)
    with pytest.raises(kh.CheckpointWriteError) as err:
        kh.train(fresh_pipe, one_pair(), cfg, progress=False)
    message = str(err.value)
    root = tmp_path / "run" / "checkpoints"
    assert "step 4" in message and str(root) in message, f"the error names the step and the folder: {message}"
    assert "step 2" in message and "resume=True" in message, f"the error names the checkpoint to resume: {message}"
    assert "No space left on device" in message, f"the cause is kept: {message}"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"], "the temporary folder must be removed"
