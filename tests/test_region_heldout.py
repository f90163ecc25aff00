"""Twin scenes and scripts/region_heldout.py: only the mask says which object to edit, and the script scores it."""

import json

import pytest
import torch

import kontext_helpers as kh


@pytest.fixture(scope="module")
def heldout(script_module):
    return script_module("region_heldout")


@pytest.fixture(scope="module")
def scene():
    return kh.render_twin_scene(1, 0, 64)


def test_a_twin_scene_differs_only_at_the_masked_object(scene):
    assert scene["prompt"].startswith("make the red ") and scene["prompt"].endswith(" blue"), (
        f"one prompt that fits both objects: {scene['prompt']!r}")
    ctx, targets, masks, boxes = scene["context"], scene["targets"], scene["masks"], scene["boxes"]
    assert targets.shape == (2, 3, 64, 64) and masks.shape == boxes.shape == (2, 1, 64, 64), "two of each"
    for k in (0, 1):
        changed = (targets[k] - ctx).abs().amax(0) > 2 / 255  # [H, W]
        assert changed.any(), f"target {k} must recolour object {k}"
        assert not (changed & (masks[k][0] < 0.5)).any(), f"target {k} changes pixels outside mask {k}"
        assert (boxes[k] >= masks[k]).all(), f"box {k} must contain mask {k}"
    assert not (masks[0] * masks[1]).any(), "the two objects' masks must not touch"
    grid = [kh.mask_to_token_grid(masks[k][None], 4, 4) for k in (0, 1)]
    assert not (grid[0] * grid[1]).any(), "nor their tokens: the mask picks one object on the token grid too"
    objs, spec_targets, prompt, _ = kh.twin_edit_spec(1, 0)
    assert prompt == scene["prompt"] and len(spec_targets) == 2, "twin_edit_spec describes the rendered scene"
    a, b = objs[0], objs[1]
    assert (a.shape, a.radius, a.colour) == (b.shape, b.radius, b.colour) == (b.shape, b.radius, "red"), (
        "the two objects are identical red twins")
    assert [o.colour for o in spec_targets[0]][:2] == ["blue", "red"], "target a recolours object a alone"
    again = kh.render_twin_scene(1, 0, 64)
    torch.testing.assert_close(again["context"], ctx, msg="the same (seed, index) draws the same scene")


def test_twin_pairs_give_both_masks_of_each_scene(scene):
    pairs = kh.TwinPairs(1, [0], 64)
    assert len(pairs) == 2 and pairs.resolution == 64, "two samples per scene"
    for k in (0, 1):
        item = pairs[k]
        torch.testing.assert_close(item["target"], scene["targets"][k], msg=f"sample {k}: object {k} recoloured")
        torch.testing.assert_close(item["mask"], scene["masks"][k], msg=f"sample {k}: the mask on object {k}")
    assert pairs[0]["prompt"] == pairs[1]["prompt"], "the same prompt for both"
    box = kh.TwinPairs(1, [0], 64, mask="box")[1]["mask"]
    torch.testing.assert_close(box, scene["boxes"][1], msg="mask='box' gives the rough masks")
    with pytest.raises(ValueError, match="tight"):
        kh.TwinPairs(1, [0], 64, mask="blob")


def test_score_counts_a_case_right_only_when_the_masked_object_alone_changed(heldout, scene):
    ctx, targets, mask = scene["context"], scene["targets"], scene["masks"][0]
    right = heldout.score(targets[0], scene, 0, mask)
    assert right["right"] and right["masked_changed"] and not right["other_changed"], f"the target itself: {right}"
    both = targets[0] + targets[1] - ctx  # both objects recoloured
    wrong = heldout.score(both, scene, 0, mask)
    assert not wrong["right"] and wrong["other_changed"], f"both recoloured is wrong: {wrong}"
    assert not heldout.score(ctx, scene, 0, mask)["right"], "nothing changed is wrong"
    assert not heldout.score(targets[1], scene, 0, mask)["right"], "the other object changed is wrong"
    assert right["out_db"] == float("inf"), "the target equals the context outside its mask"


def test_the_script_trains_evaluates_and_writes_its_report(heldout, tmp_path):
    out, figure = tmp_path / "report.json", tmp_path / "figure.png"
    result = heldout.main(["--kinds", "none", "marked", "--steps", "2", "--train-scenes", "1",
                           "--held-out-scenes", "1", "--inference-steps", "2", "--json", str(out),
                           "--figure", str(figure)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result)), "the file holds what main returns"
    expected = {"LoRA alone", "LoRA alone + blend", "inpaint pipeline + LoRA", "marked", "marked + blend"}
    assert set(written["variants"]) == expected, f"every variant of both kinds: {sorted(written['variants'])}"
    for name, by_mask in written["variants"].items():
        assert set(by_mask) == {"tight", "box"} and by_mask["tight"]["cases"] == 2, f"{name}: both masks, 2 cases"
    assert written["train_seconds"].keys() == {"none", "marked"}, "training time per kind"
    assert figure.stat().st_size > 10_000, "the figure is drawn"


def test_drawn_pairs_are_edits_with_masks_covering_every_changed_pixel():
    pairs = kh.DrawnPairs(7, 3, 64)
    assert len(pairs) == 3 and pairs.resolution == 64, "three pairs at 64 px"
    for item in pairs:
        assert "keep" not in item["name"], f"{item['name']}: keep scenes are not edits"
        changed = (item["target"] - item["context"]).abs().amax(0) > 0  # [H, W]
        assert changed.any(), f"{item['name']}: the target must differ from the context"
        assert not (changed & (item["mask"][0] < 0.5)).any(), f"{item['name']}: a changed pixel lies outside the mask"
    again = kh.DrawnPairs(7, 3, 64)
    assert [it["name"] for it in again] == [it["name"] for it in pairs], "the same stream draws the same pairs"
