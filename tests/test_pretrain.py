"""The tiny model's pretraining: drawn scenes that never repeat a data_samples pair, and a command that resumes."""

import collections
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kontext_helpers as kh
from kontext_helpers.cli import main
from kontext_helpers.scenes import EDIT_KINDS, sample_renderer


def test_no_training_scene_equals_a_data_samples_pair():
    held_out = {(tuple(s.context), tuple(s.target)) for s in sample_renderer().SCENES}
    cfg = kh.PretrainConfig()
    drawn = [kh.random_edit_spec(cfg.seed, i) for i in range(cfg.pairs)]
    clashes = [spec.slug for _, spec in drawn if (tuple(spec.context), tuple(spec.target)) in held_out]
    assert not clashes, f"training scenes equal to a data_samples pair: {clashes}"
    kinds = collections.Counter(kind for kind, _ in drawn)
    assert set(kinds) == set(EDIT_KINDS), f"every kind of edit (and keep) must be drawn, got {dict(kinds)}"


def test_a_data_samples_draw_is_replaced(monkeypatch):
    ms = sample_renderer()
    kind, spec = kh.random_edit_spec(0, 0)
    monkeypatch.setattr(ms, "SCENES", [ms.SceneSpec("copy", spec.prompt, spec.context, spec.target)])
    _, again = kh.random_edit_spec(0, 0)
    assert (again.context, again.target) != (spec.context, spec.target), "a held-out scene must never be drawn"


def test_drawn_scenes_are_reproducible_and_keep_means_the_same_image():
    kind, spec = kh.random_edit_spec(3, 17)
    assert kh.random_edit_spec(3, 17) == (kind, spec), "the same (seed, index) must give the same scene"
    keep = next(s for k, s in (kh.random_edit_spec(5, i) for i in range(50)) if k == "keep")
    pair = kh.render_training_pair(keep, size=32)
    assert pair["context"].shape == (3, 32, 32) and pair["depth"].shape == (1, 32, 32), "[3, H, W] and [1, H, W]"
    torch.testing.assert_close(pair["target"], pair["context"], msg="a keep sample's target is its context")
    assert 0.0 <= float(pair["depth"].min()) and float(pair["depth"].max()) == 1.0, "depth min-max normalised"


def _pretrain(out, weights, base_steps, decoder_steps):
    args = ["pretrain-tiny", "--out", str(out), "--weights", str(weights), "--quiet", "--pairs", "6",
            "--resolution", "32", "--vae-batch-size", "4", "--batch-size", "2", "--vae-crop-steps", "2",
            "--vae-full-steps", "1", "--probe-steps", "1", "--base-steps", str(base_steps),
            "--decoder-steps", str(decoder_steps), "--checkpoint-every", "1", "--workers", "1", "--threads", "1"]
    return main(args)


def test_pretrain_command_writes_loadable_weights_and_resumes_exactly(tmp_path, capsys):
    small = dict(pairs=6, resolution=32, vae_batch_size=4, batch_size=2, vae_crop_steps=2, vae_full_steps=1,
                 probe_steps=1, base_steps=3, decoder_steps=1, checkpoint_every=1, workers=1, threads=1)
    straight = kh.pretrain_tiny(kh.PretrainConfig(**small), str(tmp_path / "straight"),
                                str(tmp_path / "straight.safetensors"), progress=False)
    # stopped in the base phase after 2 updates, then resumed
    first = _pretrain(tmp_path / "resumed", tmp_path / "first.safetensors", base_steps=2, decoder_steps=0)
    resumed = _pretrain(tmp_path / "resumed", tmp_path / "resumed.safetensors", base_steps=3, decoder_steps=1)
    assert "resuming from" in capsys.readouterr().out, "the second run must resume the saved state"
    assert not list((tmp_path / "resumed").glob("*.tmp")), "the run state is written to a temp file, then moved"
    a, b, after_two = load_file(straight), load_file(resumed), load_file(first)
    assert a.keys() == b.keys(), "the same components in both files"
    for key in (k for k in a if k.startswith("image_encoder.")):
        torch.testing.assert_close(after_two[key], b[key], rtol=0, atol=0,
                                   msg=f"{key}: the base phase must leave the image encoder as the probe left it")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0,
                                   msg=f"{key}: a resumed run must equal a straight one")
    pipe = kh.build_tiny_pipeline(seed=1)
    kh.load_tiny_weights(pipe, resumed)
    with safe_open(resumed, "pt") as f:
        vae = json.loads(f.metadata()["vae"])
    assert pipe.vae.config.scaling_factor == pytest.approx(vae["scaling_factor"]), "the VAE's scale is loaded"
    loaded = pipe.transformer.state_dict()["proj_out.weight"]
    torch.testing.assert_close(loaded, b["transformer.proj_out.weight"].float(), rtol=0, atol=0,
                               msg="load_tiny_weights must load the file's transformer")


def test_export_only_takes_the_decoder_of_another_run_folder(tmp_path):
    small = dict(pairs=4, resolution=32, vae_batch_size=4, batch_size=2, vae_crop_steps=1, vae_full_steps=1,
                 probe_steps=1, base_steps=1, decoder_steps=0, checkpoint_every=1, workers=1, threads=1)
    kh.pretrain_tiny(kh.PretrainConfig(**small), str(tmp_path / "base"), str(tmp_path / "a.safetensors"),
                     progress=False)
    decoder = dict(small, probe_steps=0, base_steps=0, decoder_steps=2)
    kh.pretrain_tiny(kh.PretrainConfig(**decoder), str(tmp_path / "decoder"), str(tmp_path / "b.safetensors"),
                     progress=False)
    out = main(["pretrain-tiny", "--export-only", "--out", str(tmp_path / "base"), "--decoder-from",
                str(tmp_path / "decoder"), "--weights", str(tmp_path / "merged.safetensors")])
    merged, base, dec = (load_file(tmp_path / n) for n in (out, "a.safetensors", "b.safetensors"))
    for key in merged:
        source = dec if key.startswith("vae.decoder.") else base
        torch.testing.assert_close(merged[key], source[key], rtol=0, atol=0, msg=f"{key} comes from the wrong run")
    with safe_open(str(tmp_path / out), "pt") as f:
        info = json.loads(f.metadata()["info"])
    assert info["config"]["decoder_steps"] == 2 and info["steps_done"]["vae_decoder"] == 2, \
        f"the merged file must record the decoder run's updates, got {info['config']} / {info['steps_done']}"
    assert info["steps_done"]["base"] == 1, f"the base updates come from the base run, got {info['steps_done']}"


def test_make_tiny_weights_runs_the_phases_in_the_shipped_order(repo_root):
    import subprocess

    dry = subprocess.run(["make", "-n", "tiny-weights"], cwd=repo_root, capture_output=True, text=True, check=True)
    runs = [line for line in dry.stdout.replace("\\\n", " ").splitlines() if "kontext_helpers pretrain-tiny" in line]
    vae, both, export = runs[0], runs[1], runs[2]
    for flag in ("--probe-steps 0", "--base-steps 0", "--decoder-steps 0"):
        assert flag in vae, f"the first run must train the VAE alone ({flag}): {vae}"
    decoder, base = both.split("& decoder=")
    for flag in ("--probe-steps 0", "--base-steps 0"):
        assert flag in decoder, f"the decoder run must skip {flag}: {decoder}"
    for flag in ("--probe-steps 0", "--base-steps 0"):
        assert flag not in base, f"the base run must run the probe, then the base ({flag}): {base}"
    assert "--decoder-steps 0" in base, f"the base run leaves the decoder to the other run: {base}"
    assert "--export-only" in export and "--decoder-from" in export, f"the last step merges the two runs: {export}"
