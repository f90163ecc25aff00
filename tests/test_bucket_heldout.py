"""scripts/bucket_heldout.py: photos cut to three aspect ratios, one LoRA per resize policy, each held-out photo
edited at its own shape; and kh.AspectPairs, the photos it trains on."""

import json

import pytest
import torch

import kontext_helpers as kh


@pytest.fixture(scope="module")
def heldout(script_module):
    return script_module("bucket_heldout")


def test_aspect_pairs_are_drawn_scenes_cut_to_each_aspect_in_turn():
    pairs = kh.AspectPairs(2, 3, 64)
    assert [p["aspect"] for p in pairs] == list(kh.PHOTO_ASPECTS), f"4:3, 3:4, 16:9 in turn: {pairs.aspects}"
    for p in pairs:
        (aw, ah), (_, h, w) = p["aspect"], p["context"].shape
        assert abs(w / h - aw / ah) < 0.02 and max(w, h) == 96, f"{p['name']}: {w}x{h} for {aw}:{ah} of a 96 px render"
        for part in ("target", "mask", "depth"):
            assert p[part].shape[-2:] == (h, w), f"{p['name']}: {part} cut like the context"
        assert float(p["mask"].mean()) >= 0.005, f"{p['name']}: the edit lies inside the cut"
    item = {"context": torch.arange(24.0).reshape(1, 4, 6), "prompt": "x"}
    cut = kh.crop_to_aspect(item, (1, 1))
    torch.testing.assert_close(cut["context"], item["context"][:, :, 1:5], msg="the centred 4x4 box of a 6x4 image")
    assert cut["prompt"] == "x", "what is not an image stays"


def test_mask_kept_counts_what_each_policy_cuts(heldout):
    band = torch.zeros(1, 90, 160)
    band[:, :, :20] = 1.0  # a mask along the left edge of a 16:9 photo
    pairs = [{"mask": band}]
    assert heldout.mask_kept(pairs, "square", 128) == 1.0, "square keeps the whole frame"
    assert heldout.mask_kept(pairs, "crop", 128) == 0.0, "the centre square of a 16:9 photo cuts the left band away"
    assert heldout.mask_kept(pairs, "bucket", 128) > 0.9, "the 176x96 bucket cuts only a sliver"


def test_the_script_trains_each_policy_and_writes_its_report(heldout, tmp_path):
    out, fig = tmp_path / "report.json", tmp_path / "figure.png"
    report = heldout.main(["--steps", "1", "--train-scenes", "3", "--held-out-scenes", "3", "--inference-steps", "1",
                           "--json", str(out), "--figure", str(fig)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report)) and fig.stat().st_size > 0, "JSON and figure"
    assert set(report["policies"]) == {"bucket", "square", "crop"}, f"one LoRA per policy: {report['policies']}"
    bucket, square = report["policies"]["bucket"], report["policies"]["square"]
    assert len(bucket["train_buckets"]) == 3 and square["train_buckets"] == {"128x128": 3}, (
        f"three shapes with buckets, one square otherwise: {bucket['train_buckets']}, {square['train_buckets']}")
    for policy, result in report["policies"].items():
        assert set(result["held_out"]) == {"4x3", "3x4", "16x9", "all"}, f"{policy}: per aspect and in all"
        assert result["held_out"]["all"]["cases"] == 3, f"{policy}: every held-out photo scored"
