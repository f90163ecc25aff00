"""scripts/l2_forms.py and docs/l2_forms.json: the default L2 form is the measured one, and the documents quote it."""

import json

import pytest

import kontext_helpers as kh


@pytest.fixture(scope="module")
def l2_forms(script_module):
    return script_module("l2_forms")


@pytest.fixture(scope="module")
def report(repo_root):
    with open(repo_root / "docs" / "l2_forms.json") as fh:
        return json.load(fh)


def test_the_default_l2_form_is_the_one_the_measurement_chose(report):
    best = report["best"]
    summary = report["summary"]
    forms = {n: s for n, s in summary.items() if n != "none"}
    assert best["variant"] == min(forms, key=lambda n: forms[n]["held_out_eval_loss"]), (
        f"the report's best must be its lowest held-out evaluation loss: {report['rule']}")
    default, cpu = kh.TrainConfig(), kh.TrainConfig.for_gpu("cpu")
    for name, cfg in (("TrainConfig()", default), ("the cpu preset", cpu)):
        assert (cfg.l2_form, cfg.l2_lora_lambda) == (best["l2_form"], best["l2_lora_lambda"]), (
            f"{name} must use the measured best form and lambda {best} (docs/l2_forms.json), not "
            f"{(cfg.l2_form, cfg.l2_lora_lambda)}")
    assert report["preset"] == "cpu" and report["learning_rate"] == cpu.learning_rate and report["rank"] == cpu.rank, (
        "the measurement ran the cpu preset as it is now: rerun scripts/l2_forms.py after changing it")


def test_design_notes_quote_the_table_and_the_real_models_lora_count(report, l2_forms, repo_root):
    design = (repo_root / "docs" / "design.md").read_text()
    for row in l2_forms.markdown_rows(report):
        assert row in design, f"docs/design.md must quote the row of docs/l2_forms.json: {row}"
    n = kh.memory_plan(kh.TrainConfig(rank=16, lora_targets="attn"), verbose=False)["parameters"]["lora"]
    assert f"{n:,}" in design, f"docs/design.md must quote FLUX.1 Kontext [dev]'s rank-16 LoRA size {n:,}"
    assert f"{report['lora_params']:,}" in design, "and the tiny cpu preset's LoRA size the JSON records"
    base = report["base_model"]["held_out_eval"]
    assert f"evaluation loss is {base['err_in'] + base['err_out']:.3f}" in design, "the base model's, from the JSON"
    assert f"({report['seconds']:.0f} s on one thread" in design, "the run time the JSON records"
    assert f"`{report['command'].strip()}`" in design, (
        f"docs/design.md must quote the command that made the JSON: {report['command']!r}")


def test_the_script_trains_measures_and_reports_on_small_settings(l2_forms, tmp_path):
    out = tmp_path / "l2.json"
    report = l2_forms.main(["--steps", "2", "--seeds", "0", "--held-out", "1", "--variants", "none", "sum",
                            "--json", str(out), "--figure", str(tmp_path / "l2.png")])
    assert json.loads(out.read_text())["summary"].keys() == {"none", "sum"}, "one summary per variant"
    none, l2_sum = (report["summary"][k] for k in ("none", "sum"))
    assert l2_sum["a_norm"] < none["a_norm"], (
        "in two updates the sum form must already pull the A matrices in (Adam turns 2 lambda p into a full step "
        f"while B is 0): {l2_sum['a_norm']} vs {none['a_norm']}")
    assert report["runs"][0]["trace"][0]["b_norm"] == 0.0, "the trace starts at the fresh LoRA (B = 0)"
    assert (tmp_path / "l2.png").stat().st_size > 0, "the figure is written"
