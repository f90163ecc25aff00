"""scripts/depth_heldout.py: LoRAs per depth kind on depth scenes, each held-out scene edited with its own depth,
the other variant's and none, and scored by whether the edit followed the depth it got."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def heldout(script_module):
    return script_module("depth_heldout")


@pytest.fixture(scope="module")
def cases(heldout):
    return heldout.held_out_cases(2, 64)


def test_held_out_cases_pair_each_scene_with_an_alternative_of_the_same_context(cases):
    assert set(cases) == {"placement", "shape", "fog"}, f"every family: {sorted(cases)}"
    for family, pairs in cases.items():
        assert len(pairs) == 2, f"{family}: two held-out scenes"
        for own, alt in pairs:
            torch.testing.assert_close(own["context"], alt["context"], msg=f"{family}: one context, two targets")
            assert not torch.equal(own["target_depth"], alt["target_depth"]), f"{family}: the depths differ"
    (own, alt), (second, _) = cases["fog"]
    torch.testing.assert_close(alt["target_depth"], second["depth"], msg="fog's alternative: the next scene's depth")


@pytest.mark.parametrize("family", ["placement", "shape", "fog"])
def test_score_follows_the_given_depth(heldout, cases, family):
    own, alt = cases[family][0]
    right = heldout.score(own["target"], own, own, alt)
    assert right["followed"] and right["psnr_target"] == float("inf"), f"{family}: the target itself: {right}"
    swapped = heldout.score(alt["target"], own, alt, own)
    assert swapped["followed"] and swapped["psnr_target"] < 40, f"{family}: the other target follows its depth"
    assert not heldout.score(alt["target"], own, own, alt)["followed"], f"{family}: but not the own depth"


def test_lora_labels_train_none_once_and_each_depth_kind_per_dropout(heldout):
    labels = heldout.lora_labels(["none", "tokens"], [0.0, 0.1])
    assert labels == [("none", "none", 0.0), ("tokens, dropout 0", "tokens", 0.0),
                      ("tokens, dropout 0.1", "tokens", 0.1)], f"labels: {labels}"


def test_the_script_trains_evaluates_and_writes_its_report(heldout, tmp_path):
    out, figure = tmp_path / "report.json", tmp_path / "figure.png"
    result = heldout.main(["--kinds", "none", "tokens", "--steps", "2", "--train-scenes", "1",
                           "--held-out-scenes", "1", "--inference-steps", "2", "--dropout", "0.1", "--json", str(out),
                           "--figure", str(figure)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result)), "the file holds what main returns"
    assert set(written["results"]) == {"none", "tokens, dropout 0.1"}, f"one LoRA per kind: {written['results']}"
    for label, by_family in written["results"].items():
        assert set(by_family) == {"placement", "shape", "fog"}, f"{label}: every family"
        conditions = {"no depth"} if label == "none" else {"right", "swapped", "no depth", "both"}
        for family, by_condition in by_family.items():
            assert set(by_condition) == conditions, f"{label} {family}: conditions {sorted(by_condition)}"
            assert all(s["cases"] == 1 for s in by_condition.values()), f"{label} {family}: one case each"
    assert written["train_samples"] == 5, "one scene per family, both variants of placement and shape"
    assert figure.stat().st_size > 10_000, "the figure is drawn"
