"""The command line: ``train`` under ``accelerate launch`` with two CPU processes, and ``memory-plan``."""

import subprocess
import sys

import kontext_helpers as kh


def test_cli_under_accelerate_launch_two_cpu_processes(sample_data, repo_root, subprocess_env, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m",
           "kontext_helpers", "train", "--data", str(sample_data), "--out", str(out), "--resolution", "64",
           "--steps", "3", "--rank", "4", "--max-sequence-length", "32", "--checkpoint-every", "3"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600, env=subprocess_env)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "done: 3 steps" in proc.stdout, f"the CLI must report its steps: {proc.stdout[-1000:]}"
    assert [s for s, _ in kh.list_checkpoints(str(out))] == [3], "the main process writes the final checkpoint"


def test_memory_plan_command_prints_one_table_row_per_preset(capsys):
    from kontext_helpers.cli import main  # what `python -m kontext_helpers memory-plan` runs

    plans = main(["memory-plan", "--preset", "t4", "a100-80"])
    out = capsys.readouterr().out
    assert set(plans) == {"t4", "a100-80"}, f"one plan per preset: {sorted(plans)}"
    rows = [line for line in out.splitlines() if line.startswith(("| t4 ", "| a100-80 "))]
    assert len(rows) == 2 and "GB" in rows[0], f"a Markdown row per preset: {rows}"
