"""Depth scenes: one prompt per family, so only the depth map says where a box goes, which shape an object
takes, or how far each pixel is (fog); and the scorer that says whether an edit followed the depth it got."""

import pytest
import torch

from kontext_helpers import scenes


@pytest.fixture(scope="module")
def placement():
    return [scenes.render_depth_scene("placement", 1, 0, 64, variant=v) for v in (0, 1)]


@pytest.fixture(scope="module")
def shape():
    return [scenes.render_depth_scene("shape", 1, 0, 64, variant=v) for v in (0, 1)]


def test_items_have_the_documented_layout(placement):
    item = placement[0]
    assert {"context", "target", "depth", "target_depth", "mask", "silhouette", "prompt", "name", "family"} <= set(
        item), f"keys: {sorted(item)}"
    for key, channels in (("context", 3), ("target", 3), ("depth", 1), ("target_depth", 1), ("mask", 1),
                          ("silhouette", 1)):
        value = item[key]
        assert value.shape == (channels, 64, 64), f"{key} has shape {tuple(value.shape)}"
        assert float(value.min()) >= 0 and float(value.max()) <= 1, f"{key} leaves [0, 1]"
    assert bool((item["mask"] == 1).all()), "the mask is the whole image: it does not say where"
    assert float(item["depth"][0, -1].mean()) > 0.9 and float(item["depth"][0, 0].max()) == 0, (
        "near = 1 (the bottom floor row) and the sky = 0")


@pytest.mark.parametrize("family", scenes.DEPTH_FAMILIES)
def test_every_scene_of_a_family_has_the_same_prompt(family):
    prompts = {scenes.render_depth_scene(family, seed, i, 32)["prompt"] for seed in (0, 1) for i in range(3)}
    assert prompts == {scenes.DEPTH_PROMPTS[family]}, f"{family}: one prompt for every scene, got {prompts}"


@pytest.mark.parametrize("family", ["placement", "shape"])
def test_the_target_depth_differs_from_the_context_depth_only_at_the_edit(family, placement, shape):
    for item in placement if family == "placement" else shape:
        differs = (item["target_depth"] - item["depth"]).abs() > 1e-4  # [1, H, W]
        sil = item["silhouette"].bool()
        assert differs[sil].float().mean() > 0.5, f"{item['name']}: the new geometry shows in the target depth"
        if family == "placement":
            assert not (differs & ~sil).any(), f"{item['name']}: the added box alone changes the depth"
    a, b = placement if family == "placement" else shape
    torch.testing.assert_close(a["context"], b["context"], msg="both variants share one context")
    assert a["prompt"] == b["prompt"], "and one prompt"
    assert not torch.equal(a["target_depth"], b["target_depth"]), "only their target depths tell them apart"


def test_placement_boxes_are_red_and_apart_and_shapes_stay_in_place(placement, shape):
    a, b = (item["silhouette"].bool() for item in placement)
    assert not (a & b).any(), "the two box places do not overlap"
    assert not scenes.red_pixels(placement[0]["context"]).any(), "the context has no red: red marks the new box"
    for item in placement + shape:
        red = scenes.red_pixels(item["target"])
        assert scenes._iou(red, item["silhouette"].bool()) > 0.7, f"{item['name']}: the red pixels are the silhouette"
    spec, targets = scenes.depth_scene_spec("shape", 1, 0)
    shapes = [spec.context[0].shape] + [t[0].shape for t in targets]
    assert len(set(shapes)) == 3, f"the red object becomes each of the two other shapes: {shapes}"
    assert {(t[0].x, t[0].z) for t in targets} == {(spec.context[0].x, spec.context[0].z)}, "at the same place"


def test_fog_is_the_context_fogged_by_its_own_depth():
    item = scenes.render_depth_scene("fog", 1, 0, 64)
    torch.testing.assert_close(item["target_depth"], item["depth"], msg="fog keeps the geometry")
    torch.testing.assert_close(item["target"], scenes.add_fog(item["context"], item["depth"]), msg="fog by depth")
    change = (item["target"] - item["context"]).abs().amax(0)  # [H, W]
    assert float(change[0].mean()) > 2 * float(change[-1].mean()), "the far rows get more fog than the near ones"
    with pytest.raises(ValueError, match="variant"):
        scenes.render_depth_scene("fog", 1, 0, 64, variant=1)


def test_seeds_and_indices_draw_other_scenes_and_the_same_arguments_the_same(placement):
    again = scenes.render_depth_scene("placement", 1, 0, 64)
    torch.testing.assert_close(again["target"], placement[0]["target"], msg="the same arguments, the same scene")
    for other in (scenes.render_depth_scene("placement", 2, 0, 64), scenes.render_depth_scene("placement", 1, 1, 64)):
        assert not torch.equal(other["context"], placement[0]["context"]), f"{other['name']} is another scene"
    with pytest.raises(ValueError, match="family"):
        scenes.render_depth_scene("colour", 1, 0, 64)


@pytest.mark.parametrize("family", ["placement", "shape"])
def test_depth_followed_says_true_for_the_target_and_false_for_the_other_variant(family, placement, shape):
    own, other = placement if family == "placement" else shape
    right = scenes.depth_followed(own["target"], own, other)
    assert right["followed"] and right["iou_given"] > 0.7, f"{family}: the target follows its own depth: {right}"
    wrong = scenes.depth_followed(other["target"], own, other)
    assert not wrong["followed"], f"{family}: the other variant's target did not follow the given depth: {wrong}"
    unchanged = scenes.depth_followed(own["context"], own, other)
    assert unchanged["iou_given"] < 0.7, f"{family}: an unchanged context does not score high: {unchanged}"
    with pytest.raises(ValueError, match="fog"):
        fog = scenes.render_depth_scene("fog", 1, 0, 64)
        scenes.depth_followed(fog["target"], fog, fog)


def test_depth_pairs_hold_every_family_and_variant_in_the_pairs_layout():
    pairs = scenes.DepthPairs(1, [0], 64)
    assert len(pairs) == 5 and pairs.resolution == 64, f"2 placement + 2 shape + 1 fog items, got {len(pairs)}"
    assert [it["family"] for it in pairs] == ["placement", "placement", "shape", "shape", "fog"], "index-major order"
    names = [it["name"] for it in pairs]
    assert len(set(names)) == len(names), f"unique names: {names}"
    fog_only = scenes.DepthPairs(1, [0, 1], 32, families=("fog",))
    assert len(fog_only) == 2 and all("target_depth" in it for it in fog_only), "fog items carry target_depth"
    with pytest.raises(ValueError, match="families"):
        scenes.DepthPairs(1, [0], 32, families=("rain",))
