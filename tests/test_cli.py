"""The command line: ``train`` under ``accelerate launch`` with two CPU processes (logging to TensorBoard), a config
file, and ``memory-plan``."""

import os
import subprocess
import sys

import kontext_helpers as kh


def test_cli_under_accelerate_launch_two_cpu_processes(sample_data, repo_root, subprocess_env, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m",
           "kontext_helpers", "train", "--data", str(sample_data), "--out", str(out), "--resolution", "64",
           "--steps", "3", "--rank", "4", "--max-sequence-length", "32", "--checkpoint-every", "3",
           "--report-to", "tensorboard"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600, env=subprocess_env)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "done: 3 steps" in proc.stdout, f"the CLI must report its steps: {proc.stdout[-1000:]}"
    assert [s for s, _ in kh.list_checkpoints(str(out))] == [3], "the main process writes the final checkpoint"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "kontext-lora")).Reload()
    steps = [e.step for e in events.Scalars("loss/total")]
    assert steps == [1, 2, 3], f"the main process alone logs one loss per update to TensorBoard: {steps}"


def test_memory_plan_command_prints_one_table_row_per_preset(capsys):
    from kontext_helpers.cli import main  # what `python -m kontext_helpers memory-plan` runs

    plans = main(["memory-plan", "--preset", "t4", "a100-80"])
    out = capsys.readouterr().out
    assert set(plans) == {"t4", "a100-80"}, f"one plan per preset: {sorted(plans)}"
    rows = [line for line in out.splitlines() if line.startswith(("| t4 ", "| a100-80 "))]
    assert len(rows) == 2 and "GB" in rows[0], f"a Markdown row per preset: {rows}"


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_config_file_sets_every_field_and_the_flags_override_it(sample_data, tmp_path):
    from kontext_helpers.cli import _cli_parser, _run_settings

    cfg = _write(tmp_path / "run.yaml", f"data: {sample_data}\nout: {tmp_path / 'run'}\nrank: 4\nsteps: 50\n"
                                        "learning_rate: 0.002\nregion_kind: cells\nuse_depth: false\nalpha: 8\n")
    args = _cli_parser().parse_args(["train", "--config", cfg, "--steps", "2", "--resize", "crop"])
    run, overrides = _run_settings(args)
    config = kh.TrainConfig(**overrides)
    assert (config.rank, config.learning_rate, config.region_kind, config.use_depth, config.alpha) == (
        4, 0.002, "cells", False, 8), f"the file's settings must reach the TrainConfig: {config}"
    assert config.steps == 2, "a flag overrides the file"
    assert run["data"] == str(sample_data) and run["resize"] == "crop" and run["model"] == "tiny", (
        f"run keys come from the file, the flags, or their defaults: {run}")
    assert config.output_dir == str(tmp_path / "run"), "out becomes output_dir"
    depth_file = _write(tmp_path / "depth.yaml", f"data: {sample_data}\nout: {tmp_path / 'run'}\n"
                                                 "depth_kind: ip_adapter\ndepth_dropout: 0.2\n")
    args = _cli_parser().parse_args(["train", "--config", depth_file, "--depth-kind", "tokens", "--depth-source",
                                     "target", "--depth-dropout", "0.3"])
    config = kh.TrainConfig(**_run_settings(args)[1])
    assert (config.depth_kind, config.depth_source, config.depth_dropout) == ("tokens", "target", 0.3), (
        f"--depth-kind, --depth-source and --depth-dropout (and the file's keys) reach the TrainConfig: {config}")


def test_config_file_with_unknown_or_mistyped_settings_is_one_clear_error(tmp_path):
    import pytest

    from kontext_helpers.cli import read_config_file

    bad = _write(tmp_path / "bad.yaml", "rnak: 4\nsteps: many\nuse_depth: 1\nlearning_rate: 1\n")
    with pytest.raises(ValueError) as err:
        read_config_file(bad)
    text = str(err.value)
    assert "bad.yaml" in text and "unknown setting 'rnak'" in text and "did you mean 'rank'" in text, text
    assert "steps: 'many'" in text and "use_depth: 1" in text, f"mistyped values are named: {text}"
    assert "learning_rate" not in text, "an int is a fine float"
    with pytest.raises(ValueError, match="mapping"):
        read_config_file(_write(tmp_path / "list.yaml", "- rank\n- 4\n"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_config_file(str(tmp_path / "missing.yaml"))


def test_train_from_a_config_file_saves_and_pushes_an_adapter(sample_data, tmp_path, monkeypatch):
    import huggingface_hub

    from kontext_helpers.cli import main

    uploads = []

    class HubStandIn:  # HfApi's two calls, offline
        def create_repo(self, *, repo_id, private, exist_ok, token):
            uploads.append(("create", repo_id, private))

        def upload_folder(self, *, folder_path, repo_id, token, commit_message):
            uploads.append(("upload", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(huggingface_hub, "HfApi", HubStandIn)
    held = kh.DrawnPairs(7, 1, 64)[0]  # a pair training never sees, as a one-pair folder
    kh.write_pair_folder(tmp_path / "held", [held["context"]], [held["target"]], [held["mask"]], [held["depth"]],
                         [held["prompt"]], names=[held["name"]], resolution=64)
    previewed = []
    real_preview = kh.training._training_preview
    monkeypatch.setattr(kh.training, "_training_preview",
                        lambda pipe, region, item, *a: previewed.append(item["name"]) or real_preview(pipe, region,
                                                                                                       item, *a))
    cfg = _write(tmp_path / "run.yaml", f"data: {sample_data}\nout: {tmp_path / 'run'}\nresolution: 64\nsteps: 1\n"
                                        "rank: 2\nmax_sequence_length: 32\ncheckpoint_every: 0\npreview_every: 1\n"
                                        f"preview_steps: 2\npreview_data: {tmp_path / 'held'}\n")
    result = main(["train", "--config", cfg, "--push-to-hub", "me/edit"])
    assert previewed == [held["name"]], f"preview_data's first pair is the one previewed: {previewed}"
    assert os.listdir(tmp_path / "run" / "adapter" / "images") == ["preview_00.png"], "the last preview is on the card"
    assert len(result.history) == 1, "one update, as the file says"
    assert (tmp_path / "run" / "adapter" / kh.LORA_WEIGHT_FILE).is_file(), "the adapter is saved under out"
    assert uploads[0] == ("create", "me/edit", True) and uploads[1][:2] == ("upload", "me/edit"), uploads
    assert {"README.md", kh.LORA_WEIGHT_FILE, kh.REGION_WEIGHT_FILE, "images"} <= set(uploads[1][2]), (
        f"the pushed folder holds the card and the weights: {uploads[1][2]}")
