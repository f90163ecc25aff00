"""Every figure the README and docs/*.md quote from a measurement equals the file that measurement wrote.

Each check finds one passage in a document (whitespace and line breaks ignored), reads the numbers it quotes and
compares each with its source: the JSON written by the script that measured it (``docs/*.json``,
``kontext_helpers/block_calibration.json``) or the code that computes it (``kh.memory_plan``, a test's bound, a
benchmark's limit). A quoted figure may differ from its source by its own rounding and no more.
"""

from __future__ import annotations

import ast
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"([-+]?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?)"  # a quoted number: 17.0, -0.04, +1.44, 1,500, 3e-2


def read_doc(name: str) -> str:
    """A document with every run of whitespace as one space, so a passage may wrap anywhere."""
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return " ".join(f.read().split())


def read_json(name: str) -> dict:
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return json.load(f)


def quoted(doc: str, passage: str) -> list[str]:
    """The numbers at the ``{}`` places of ``passage`` in ``doc`` (the passage must occur exactly once)."""
    text = read_doc(doc)
    pattern = NUM.join(re.escape(re.sub(r"\s+", " ", part)) for part in passage.split("{}"))
    found = re.findall(pattern, text)
    assert len(found) == 1, f"{doc}: the passage {passage!r} must occur once, found {len(found)} times"
    return [found[0]] if isinstance(found[0], str) else list(found[0])


def check(doc: str, passage: str, sources: list[tuple[str, float]]) -> None:
    """Each number of ``passage`` equals its source ``(name, value)`` to the number's own last digit."""
    numbers = quoted(doc, passage)
    assert len(numbers) == len(sources), f"{doc}: {passage!r} quotes {len(numbers)} numbers, {len(sources)} sources"
    for text, (name, value) in zip(numbers, sources):
        quoted_value = float(text.replace(",", ""))
        if "e" in text:  # written in powers of ten: exact
            tolerance = 1e-9 * abs(value)
        else:  # rounded to its last digit
            tolerance = 0.5 * 10 ** -(len(text.split(".")[1]) if "." in text else 0) + 1e-9
        assert abs(quoted_value - value) <= tolerance, (
            f"{doc}: {passage!r} quotes {text} where {name} is {value:.4f}: update the document from the file")


def at(data: dict, source: str, *keys):
    """``data[k1][k2]...`` with its name, ``source: k1 / k2 / ...``, for the failure message."""
    value = data
    for key in keys:
        value = value[key]
    return f"{source}: {' / '.join(str(k) for k in keys)}", value


def pct(named):
    name, value = named
    return name + " (x 100)", 100 * value


def mean_of(*named):
    return " and ".join(n for n, _ in named) + " (mean)", sum(v for _, v in named) / len(named)


# --- docs/region_heldout.json: the twin scenes (scripts/region_heldout.py)

REGION = "docs/region_heldout.json"


def region(*keys):
    return at(read_json(REGION), REGION, "variants", *keys)


@pytest.mark.parametrize("row, variant", [
    ("| LoRA alone |", "LoRA alone"),
    ("| LoRA alone + `blend=True` (= `FluxKontextInpaintPipeline` + LoRA) |", "LoRA alone + blend"),
    ("| LoRA alone + `blend=True` (= `FluxKontextInpaintPipeline` + LoRA) |", "inpaint pipeline + LoRA"),
    ("| the original design's region token (`\"linear\"`) |", "linear"),
    ("| marked tokens + `blend=True` |", "marked + blend"),
])
def test_readme_twin_scene_table(row, variant):
    check("README.md", row + " {}% / {}% | {} dB | {} dB |",
          [pct(region(variant, "tight", "accuracy")), pct(region(variant, "box", "accuracy")),
           region(variant, "tight", "in_db"), region(variant, "tight", "out_db")])


def test_readme_twin_scene_default_row_and_setup():
    check("README.md", "| **marked tokens (`\"marked\"`, the default)** | **{}% / {}%** | **{} dB** | {} dB |",
          [pct(region("marked", "tight", "accuracy")), pct(region("marked", "box", "accuracy")),
           region("marked", "tight", "in_db"), region("marked", "tight", "out_db")])
    data = read_json(REGION)
    check("README.md", "kind trains on {} such scenes; {} held-out scenes are edited with the mask on each object "
          "(tight and box masks, {} cases each)",
          [(f"{REGION}: train_samples / 4 (two masks, tight and box)", data["train_samples"] / 4),
           at(data, REGION, "held_out_scenes"), region("marked", "tight", "cases")])


def test_readme_twin_scenes_with_depth():
    source = "docs/region_heldout_depth.json"
    data = read_json(source)
    check("README.md", "`\"marked\"` is right in {}% / {}% of the cases ({} dB inside, {} dB outside)",
          [pct(at(data, source, "variants", "marked", "tight", "accuracy")),
           pct(at(data, source, "variants", "marked", "box", "accuracy")),
           at(data, source, "variants", "marked", "tight", "in_db"),
           at(data, source, "variants", "marked", "tight", "out_db")])


@pytest.mark.parametrize("row, variant, training", [
    ("| LoRA alone (`region_kind=\"none\"`) |", "LoRA alone", "none"),
    ("| LoRA alone + `blend=True` |", "LoRA alone + blend", None),
    ("| `FluxKontextInpaintPipeline` + the same LoRA |", "inpaint pipeline + LoRA", None),
    ("| `\"linear\"` (the original design's token) |", "linear", "linear"),
    ("| `\"linear\"` + blend |", "linear + blend", None),
    ("| `\"marked_context\"` |", "marked_context", "marked_context"),
    ("| `\"marked_context\"` + blend |", "marked_context + blend", None),
    ("| `\"cells\"` |", "cells", "cells"),
    ("| `\"cells\"` + blend |", "cells + blend", None),
    ("| `\"marked\"` + blend |", "marked + blend", None),
])
def test_design_twin_scene_table(row, variant, training):
    passage = row + " {}% / {}% | {}% | {} / {} | {} / {} |" + (" {} s |" if training else " |")
    sources = [pct(region(variant, "tight", "accuracy")), pct(region(variant, "box", "accuracy")),
               pct(region(variant, "tight", "other_changed")), region(variant, "tight", "in_db"),
               region(variant, "box", "in_db"), region(variant, "tight", "out_db"), region(variant, "box", "out_db")]
    if training:
        sources.append(at(read_json(REGION), REGION, "train_seconds", training))
    check("docs/design.md", passage, sources)


def test_design_twin_scene_default_row():
    check("docs/design.md", "| **`\"marked\"` (the default)** | **{}% / {}%** | {}% | **{} / {}** | {} / {} | {} s |",
          [pct(region("marked", "tight", "accuracy")), pct(region("marked", "box", "accuracy")),
           pct(region("marked", "tight", "other_changed")), region("marked", "tight", "in_db"),
           region("marked", "box", "in_db"), region("marked", "tight", "out_db"), region("marked", "box", "out_db"),
           at(read_json(REGION), REGION, "train_seconds", "marked")])


def test_design_twin_scene_text():
    data = read_json(REGION)
    doc = "docs/design.md"
    check(doc, "a `cpu`-preset LoRA ({} updates) trained on {} scenes", [
        at(data, REGION, "steps"), (f"{REGION}: train_samples / 4", data["train_samples"] / 4)])
    check(doc, "by 4 px): {} samples. Then {} held-out scenes", [
        at(data, REGION, "train_samples"), at(data, REGION, "held_out_scenes")])
    check(doc, "with tight and with box masks: {} cases per mask type, {} steps", [
        region("marked", "tight", "cases"), at(data, REGION, "num_inference_steps")])
    check(doc, "it recolours both ({}% right)", [pct(region("LoRA alone", "tight", "accuracy"))])
    check(doc, "The original design's single token half works** ({}%)", [pct(region("linear", "tight", "accuracy"))])
    check(doc, "learned per grid cell from {} samples. The context-only mark does worse ({}%)", [
        at(data, REGION, "train_samples"), pct(region("marked_context", "tight", "accuracy"))])
    both = [region(kind, masks, "accuracy") for kind in ("marked", "cells") for masks in ("tight", "box")]
    assert all(value == 1.0 for _, value in both), f"{doc} says the marked and cell tokens are right in every case"
    check(doc, "edit the masked object alone in all {} cases, box masks included, and keep {} dB outside", [
        (f"{REGION}: 2 x cases", 2 * region("marked", "tight", "cases")[1]),
        (f"{REGION}: the least out_db of marked and cells",
         min(region(kind, masks, "out_db")[1] for kind in ("marked", "cells") for masks in ("tight", "box")))])
    check(doc, "its training took {} s against {} s in this run", [
        at(data, REGION, "train_seconds", "cells"), at(data, REGION, "train_seconds", "marked")])
    check(doc, "({}% with any LoRA, the same as the inpaint pipeline", [
        pct(region("LoRA alone + blend", "tight", "accuracy"))])
    assert region("inpaint pipeline + LoRA", "tight", "accuracy")[1] == region("LoRA alone + blend", "tight",
                                                                               "accuracy")[1], REGION
    check(doc, "outside the mask it cannot change anything ({} dB)", [
        (f"{REGION}: out_db of every + blend variant (the least)",
         min(v["out_db"] for name, masks in data["variants"].items() if "blend" in name for v in masks.values()))])
    costs = [data["variants"][kind][masks]["in_db"] - data["variants"][kind + " + blend"][masks]["in_db"]
             for kind in ("LoRA alone", "linear", "marked_context", "cells", "marked") for masks in ("tight", "box")]
    check(doc, "it costs {} to {} dB inside across the kinds and mask types", [
        (f"{REGION}: the least in_db(kind) - in_db(kind + blend)", min(costs)),
        (f"{REGION}: the largest in_db(kind) - in_db(kind + blend)", max(costs))])
    check(doc, "({} -> {} dB for `\"marked\"` with tight masks, {} -> {} dB with box masks)", [
        region("marked", "tight", "in_db"), region("marked + blend", "tight", "in_db"),
        region("marked", "box", "in_db"), region("marked + blend", "box", "in_db")])
    check(doc, "costs the default nothing measurable here ({} dB both)", [region("marked", "box", "in_db")])
    assert abs(region("marked", "box", "in_db")[1] - region("marked", "tight", "in_db")[1]) < 0.05, doc


def test_design_twin_scenes_with_depth():
    source = "docs/region_heldout_depth.json"
    data = read_json(source)
    check("docs/design.md", "edits the masked object alone in {}% of the cases with tight and with box masks "
          "({} dB inside, {} dB outside)",
          [pct(at(data, source, "variants", "marked", "tight", "accuracy")),
           at(data, source, "variants", "marked", "tight", "in_db"),
           at(data, source, "variants", "marked", "tight", "out_db")])
    assert data["variants"]["marked"]["box"]["accuracy"] == 1.0, f"docs/design.md: box masks too ({source})"


# --- docs/depth_heldout.json: the depth scenes (scripts/depth_heldout.py)

DEPTH = "docs/depth_heldout.json"


def depth(*keys):
    return at(read_json(DEPTH), DEPTH, "results", *keys)


def followed(lora, family):
    """The share of right and swapped cases followed (both have the same number of cases)."""
    return mean_of(depth(lora, family, "right", "followed"), depth(lora, family, "swapped", "followed"))


@pytest.mark.parametrize("row, lora", [
    ("| the original design's IP-Adapter (`\"ip_adapter\"`) | {}% ({}% / {}%) |", "ip_adapter, dropout 0"),
    ("| depth per token (`\"tokens\"`), no dropout | **{}% ({}% / {}%)** |", "tokens, dropout 0"),
    ("| **depth per token, dropout 0.1 (the default)** | **{}% ({}% / {}%)** |", "tokens, dropout 0.1"),
])
def test_readme_depth_scene_table(row, lora):
    check("README.md", row + " {} / {} dB | {}% | {} / {} / {} dB |", [
        pct(followed(lora, "placement")), pct(depth(lora, "placement", "right", "followed")),
        pct(depth(lora, "placement", "swapped", "followed")), depth(lora, "placement", "right", "psnr_target"),
        depth(lora, "placement", "swapped", "psnr_target"), pct(followed(lora, "shape")),
        depth(lora, "fog", "right", "psnr_target"), depth(lora, "fog", "swapped", "psnr_target"),
        depth(lora, "fog", "no depth", "psnr_target")])


def test_readme_depth_scene_no_depth_row_and_setup():
    check("README.md", "| LoRA without depth | ({}% by chance) | {} dB, no map | ({}% by chance) | {} dB, no map |", [
        pct(depth("none", "placement", "no depth", "followed")), depth("none", "placement", "no depth", "psnr_target"),
        pct(depth("none", "shape", "no depth", "followed")), depth("none", "fog", "no depth", "psnr_target")])
    data = read_json(DEPTH)
    check("README.md", "(its depth module at {}) trains on {} scenes per family", [
        at(data, DEPTH, "depth_learning_rate"),
        (f"{DEPTH}: train_samples / 5 (two targets for placement and shape, one for fog)", data["train_samples"] / 5)])
    check("README.md", "{} held-out scenes per family are edited with their own depth map and with the other "
          "target's ({} cases per family)", [at(data, DEPTH, "held_out_scenes"),
                                             (f"{DEPTH}: 2 x held_out_scenes", 2 * data["held_out_scenes"])])


@pytest.mark.parametrize("row, lora, training", [
    ("| IP-Adapter (`\"ip_adapter\"`, the original design) | {}% ({}% / {}%), {}% |", "ip_adapter, dropout 0",
     "ip_adapter, dropout 0.1"),
    ("| depth per token (`\"tokens\"`), dropout 0 | **{}%** ({}% / {}%), {}% |", "tokens, dropout 0",
     "tokens, dropout 0"),
    ("| **depth per token, dropout 0.1 (the default)** | **{}%** ({}% / {}%), {}% |", "tokens, dropout 0.1",
     "tokens, dropout 0.1"),
])
def test_design_depth_scene_table(row, lora, training):
    sources = []
    for family in ("placement", "shape"):
        if family == "shape":
            sources += [pct(followed(lora, family)), pct(depth(lora, family, "right", "followed")),
                        pct(depth(lora, family, "swapped", "followed")), pct(depth(lora, family, "both", "followed"))]
        sources += [depth(lora, family, case, "psnr_target") for case in ("right", "swapped", "no depth")]
    sources += [depth(lora, "fog", case, "psnr_target") for case in ("right", "swapped", "no depth")]
    head = [pct(followed(lora, "placement")), pct(depth(lora, "placement", "right", "followed")),
            pct(depth(lora, "placement", "swapped", "followed")), pct(depth(lora, "placement", "both", "followed"))]
    passage = row + " {} / {} / {} dB | {}% ({}% / {}%), {}% | {} / {} / {} dB | {} / {} / {} dB |"
    if training:
        passage += " {} s |"
        sources.append(at(read_json(DEPTH), DEPTH, "train_seconds", training))
    check("docs/design.md", passage, head + sources)


def test_design_depth_scene_no_depth_row():
    check("docs/design.md", "| no depth (`depth_kind=\"none\"`) | (no depth: {}%) | - / - / {} dB | (no depth: {}%) | "
          "- / - / {} dB | - / - / {} dB | {} s |", [
              pct(depth("none", "placement", "no depth", "followed")),
              depth("none", "placement", "no depth", "psnr_target"),
              pct(depth("none", "shape", "no depth", "followed")),
              depth("none", "shape", "no depth", "psnr_target"), depth("none", "fog", "no depth", "psnr_target"),
              at(read_json(DEPTH), DEPTH, "train_seconds", "none")])
    ip = read_json(DEPTH)["results"]
    assert ip["ip_adapter, dropout 0"] == ip["ip_adapter, dropout 0.1"], (
        f"docs/design.md says both IP-Adapter rows are one LoRA: {DEPTH} must hold the same results for both")


def test_design_depth_scene_text():
    data = read_json(DEPTH)
    doc = "docs/design.md"
    check(doc, "region signal ({} updates, {} training scenes per family", [
        at(data, DEPTH, "steps"), (f"{DEPTH}: train_samples / 5", data["train_samples"] / 5)])
    check(doc, "and the one fog target: {} samples)", [at(data, DEPTH, "train_samples")])
    check(doc, "right and swapped are both cases ({} per family)", [
        (f"{DEPTH}: 2 x held_out_scenes", 2 * data["held_out_scenes"])])
    ip = "ip_adapter, dropout 0"
    check(doc, "({} dB right, swapped and none; {}% followed, chance)", [
        depth(ip, "placement", "right", "psnr_target"), pct(followed(ip, "placement"))])
    for case in ("swapped", "no depth"):
        assert round(depth(ip, "placement", case, "psnr_target")[1], 1) == round(
            depth(ip, "placement", "right", "psnr_target")[1], 1), f"{doc}: the IP-Adapter's {case} edit differs"
    check(doc, "({}% without dropout, {}% with it; the swapped map moves the box, {} -> {} dB", [
        pct(followed("tokens, dropout 0", "placement")), pct(followed("tokens, dropout 0.1", "placement")),
        depth("tokens, dropout 0", "placement", "right", "psnr_target"),
        depth("tokens, dropout 0", "placement", "swapped", "psnr_target")])
    shape = [followed(lora, "shape")[1] for lora in ("ip_adapter, dropout 0", "tokens, dropout 0",
                                                     "tokens, dropout 0.1")]
    check(doc, "No kind follows the new shape reliably ({}-{}%", [
        (f"{DEPTH}: the least shape followed", 100 * min(shape)),
        (f"{DEPTH}: the most shape followed", 100 * max(shape))])
    check(doc, "the per-token LoRA gets {} dB, with another scene's {} dB (dropout 0)", [
        depth("tokens, dropout 0", "fog", "right", "psnr_target"),
        depth("tokens, dropout 0", "fog", "swapped", "psnr_target")])
    check(doc, "costs a little placement ({}% -> {}%)", [
        pct(followed("tokens, dropout 0", "placement")), pct(followed("tokens, dropout 0.1", "placement"))])
    check(doc, "({} against {} dB on placement, {} against {} on shape, {} against {} on fog)", [
        source for family in ("placement", "shape", "fog") for source in (
            depth("tokens, dropout 0.1", family, "no depth", "psnr_target"),
            depth("tokens, dropout 0", family, "no depth", "psnr_target"))])
    check(doc, "This script trains it at {} (`--depth-learning-rate`)", [at(data, DEPTH, "depth_learning_rate")])


# --- docs/tiny_model_figures.json: the tiny model (scripts/tiny_editor_report.py)

TINY = "docs/tiny_model_figures.json"


def tiny():
    return read_json(TINY)


def lora_pair(pair: str) -> dict:
    return next(r for r in tiny()["lora"] if r["pair"].startswith(pair))


def lora_figure(pair: str, variant: str, key: str):
    return f"{TINY}: lora / {pair} / {variant} / {key}", lora_pair(pair)[variant][key]


def base_gaps(by_seed: bool = False) -> list[float]:
    rows = tiny()["base_keep"]
    if by_seed:
        return [r["vae_db"] - s for r in rows for s in r["empty_prompt_db_by_seed"]]
    return [r["vae_db"] - r["empty_prompt_db"] for r in rows]


def test_tiny_model_table():
    data, doc = tiny(), "docs/tiny_model.md"
    vae = data["vae_db"]
    check(doc, "| VAE, 10 contexts at 128 px | mean {} dB, min {} dB |", [
        (f"{TINY}: vae_db (mean)", sum(vae) / len(vae)), (f"{TINY}: vae_db (min)", min(vae))])
    empty = [r["empty_prompt_db"] for r in data["base_keep"]]
    gaps = base_gaps()
    check(doc, "| base, empty prompt, sample_edit defaults, vs context | {} - {} dB (mean {}); {} to {} dB under "
          "the VAE (mean {}); {} of {} within 1 dB, all >= 27 |", [
              (f"{TINY}: base_keep / empty_prompt_db (min)", min(empty)),
              (f"{TINY}: base_keep / empty_prompt_db (max)", max(empty)),
              (f"{TINY}: base_keep / empty_prompt_db (mean)", sum(empty) / len(empty)),
              (f"{TINY}: vae_db - empty_prompt_db (min)", min(gaps)),
              (f"{TINY}: vae_db - empty_prompt_db (max)", max(gaps)),
              (f"{TINY}: vae_db - empty_prompt_db (mean)", sum(gaps) / len(gaps)),
              (f"{TINY}: pairs within 1 dB", sum(g <= 1 for g in gaps)), (f"{TINY}: pairs", len(gaps))])
    assert min(empty) >= 27, f"{doc} says every empty-prompt output is >= 27 dB; {TINY} has {min(empty):.2f}"
    seeds = base_gaps(by_seed=True)
    worst = max(range(len(seeds)), key=seeds.__getitem__) // 4
    check(doc, "| same, seeds 0 to 3 | {} of {} within 1 dB of the VAE; mean {} dB under, worst {} dB (pair {}) |", [
        (f"{TINY}: outputs within 1 dB over empty_prompt_db_by_seed", sum(g <= 1 for g in seeds)),
        (f"{TINY}: outputs over empty_prompt_db_by_seed", len(seeds)),
        (f"{TINY}: vae_db - empty_prompt_db_by_seed (mean)", sum(seeds) / len(seeds)),
        (f"{TINY}: vae_db - empty_prompt_db_by_seed (max)", max(seeds)), (f"{TINY}: the worst pair", worst)])
    keep = [r["keep_prompt_db"] for r in data["base_keep"]]
    check(doc, "| base, \"keep the scene\" | {} - {} dB |", [
        (f"{TINY}: keep_prompt_db (min)", min(keep)), (f"{TINY}: keep_prompt_db (max)", max(keep))])
    pairs = ("0000", "0001", "0007")
    check(doc, "| cpu-preset LoRA, in-mask PSNR to target (pairs 0, 1, 7) | {} -> {}, {} -> {}, {} -> {} dB |", [
        lora_figure(p, v, "psnr_in_vs_target") for p in pairs for v in ("base", "lora")])
    check(doc, "| same, out-of-mask PSNR to context | {}, {}, {} dB |", [
        lora_figure(p, "lora", "psnr_out_vs_context") for p in pairs])
    for label, off in (("region signal", "lora_no_region"), ("depth", "lora_no_depth")):
        deltas = [(f"{TINY}: lora / {p} / lora - {off} / {key}",
                   lora_pair(p)["lora"][key] - lora_pair(p)[off][key])
                  for key in ("psnr_in_vs_target", "psnr_out_vs_context") for p in pairs]
        check(doc, f"| {label} on vs off | {{}}, {{}}, {{}} dB in the mask; {{}}, {{}}, {{}} dB outside |", deltas)
    blank = [r["depth_db"] - r["no_depth_db"] for r in data["depth_alone"]]
    check(doc, "| from a blank context, depth on vs off | {} to {} dB; the output is nearest its own scene in {} of "
          "{}, with and without depth |", [
              (f"{TINY}: depth_alone / depth_db - no_depth_db (min)", min(blank)),
              (f"{TINY}: depth_alone / depth_db - no_depth_db (max)", max(blank)),
              (f"{TINY}: depth_alone / depth_nearest == pair", sum(r["depth_nearest"] == r["pair"]
                                                                  for r in data["depth_alone"])),
              (f"{TINY}: depth_alone", len(data["depth_alone"]))])
    same_both_ways = [(r["depth_nearest"] == r["pair"]) == (r["no_depth_nearest"] == r["pair"])
                      for r in data["depth_alone"]]
    assert all(same_both_ways), (
        f"{doc}: 'with and without depth' needs the same nearest scene both ways in {TINY}")
    check(doc, "| image embeddings of the ten depth maps, spread / length | {}% |", [
        pct(at(data, TINY, "depth_embedding_spread"))])
    seconds = [r["train_seconds"] for r in data["lora"]]
    check(doc, "| LoRA training time ({} updates, one thread) | {} - {} s |", [
        at(data, TINY, "preset", "steps"), (f"{TINY}: lora / train_seconds (min)", min(seconds)),
        (f"{TINY}: lora / train_seconds (max)", max(seconds))])


def test_tiny_model_text():
    data, doc = tiny(), "docs/tiny_model.md"
    gaps = base_gaps()
    check(doc, "misses it by {} dB on the tenth (pair {}: {} dB under the VAE)", [
        (f"{TINY}: the largest vae_db - empty_prompt_db, minus 1", max(gaps) - 1),
        (f"{TINY}: the pair with the largest gap", max(range(len(gaps)), key=gaps.__getitem__)),
        (f"{TINY}: vae_db - empty_prompt_db (max)", max(gaps))])
    check(doc, "it gives the context back at {} dB under the VAE on average", [
        (f"{TINY}: vae_db - empty_prompt_db (mean)", sum(gaps) / len(gaps))])
    seeds = base_gaps(by_seed=True)
    check(doc, "over seeds 0 to 3, {} of the {} outputs lie within 1 dB, and the worst (pair 7 again) {} dB under", [
        (f"{TINY}: outputs within 1 dB over empty_prompt_db_by_seed", sum(g <= 1 for g in seeds)),
        (f"{TINY}: outputs", len(seeds)), (f"{TINY}: vae_db - empty_prompt_db_by_seed (max)", max(seeds))])
    check(doc, "at 10,000, {} dB", [(f"{TINY}: base_keep / 0000 / vae_db - empty_prompt_db", gaps[0])])
    check(doc, "its in-mask PSNR to the target is {} dB before any LoRA, but it disturbs the rest of the scene ({} dB "
          "outside the mask); the LoRA lifts the outside to {} dB", [
              lora_figure("0001", "base", "psnr_in_vs_target"), lora_figure("0001", "base", "psnr_out_vs_context"),
              lora_figure("0001", "lora", "psnr_out_vs_context")])
    outside = [lora_pair(p)["lora"]["psnr_out_vs_context"] for p in ("0000", "0001", "0007")]
    check(doc, "keeps the rest of the scene at {} dB or more", [(f"{TINY}: lora / psnr_out_vs_context (min, floored)",
                                                                float(int(min(outside))))])
    region = [lora_pair(p)["lora"]["psnr_in_vs_target"] - lora_pair(p)["lora_no_region"]["psnr_in_vs_target"]
              for p in ("0000", "0001", "0007")]
    check(doc, "The region signal adds {} to {} dB inside the mask of a one-pair LoRA and the depth under {} dB", [
        (f"{TINY}: lora - lora_no_region, psnr_in_vs_target (min)", min(region)),
        (f"{TINY}: lora - lora_no_region, psnr_in_vs_target (max)", max(region)),
        (f"{TINY}: |lora - lora_no_depth| (max, rounded up to 0.1)", 0.1)])
    assert max(abs(depth_on_off) for depth_on_off in _depth_on_off()) < 0.1, f"{doc}: depth under 0.1 dB ({TINY})"
    check(doc, "their embeddings spread over {}% of their length", [pct(at(data, TINY, "depth_embedding_spread"))])


def _depth_on_off() -> list[float]:
    return [lora_pair(p)["lora"][key] - lora_pair(p)["lora_no_depth"][key] for p in ("0000", "0001", "0007")
            for key in ("psnr_in_vs_target", "psnr_out_vs_context")]


def test_design_says_depth_moves_the_tiny_edit_under_a_tenth_of_a_db():
    check("docs/design.md", "On the tiny model depth on vs off changes the edit by under {} dB", [
        (f"{TINY}: |lora - lora_no_depth| (max, rounded up to 0.1)", 0.1)])
    assert max(abs(d) for d in _depth_on_off()) < 0.1, f"docs/design.md: depth under 0.1 dB ({TINY})"


def test_readme_tiny_model_paragraph():
    data = tiny()
    vae, empty = data["vae_db"], [r["empty_prompt_db"] for r in data["base_keep"]]
    gaps = base_gaps()
    check("README.md", "its VAE reconstructs the contexts at {} dB on average ({} dB at worst); with an empty prompt "
          "the base model gives the context back at {} to {} dB, {} dB under the VAE on average", [
              (f"{TINY}: vae_db (mean)", sum(vae) / len(vae)), (f"{TINY}: vae_db (min)", min(vae)),
              (f"{TINY}: base_keep / empty_prompt_db (min)", min(empty)),
              (f"{TINY}: base_keep / empty_prompt_db (max)", max(empty)),
              (f"{TINY}: vae_db - empty_prompt_db (mean)", sum(gaps) / len(gaps))])
    outside = [lora_pair(p)["lora"]["psnr_out_vs_context"] for p in ("0000", "0001", "0007")]
    check("README.md", "lifts the in-mask PSNR to the target from {} to {} dB (recolour), {} to {} dB and {} to {} dB "
          "(removals), and keeps {} to {} dB outside the mask", [
              *[lora_figure(p, v, "psnr_in_vs_target") for p in ("0000", "0001", "0007") for v in ("base", "lora")],
              (f"{TINY}: lora / psnr_out_vs_context (min)", min(outside)),
              (f"{TINY}: lora / psnr_out_vs_context (max)", max(outside))])


# --- code and calibration: memory, the benchmark's limit, the tests' bounds, the presets


def test_readme_memory_table_and_peaks():
    import kontext_helpers as kh

    calibration = "kontext_helpers/block_calibration.json"
    peaks = read_json(calibration)["presets"]
    for key in ("t4", "l4", "a100-40", "a100-80", "h100"):
        config = kh.TrainConfig.for_gpu(key)
        plan = kh.memory_plan(config, verbose=False)
        check("README.md", f"| {key} | {kh.GPU_PRESETS[key]['label']} | rank {{}}, {{}} px | {{}} GB | {{}} GB | "
              "{} GB |", [
                  (f"TrainConfig.for_gpu({key!r}).rank", config.rank),
                  (f"TrainConfig.for_gpu({key!r}).resolution", config.resolution),
                  (f"kh.memory_plan(for_gpu({key!r}))['gpu_weights_gb']", plan["gpu_weights_gb"]),
                  at(peaks, calibration, key, "total_gb"),
                  (f"kh.memory_plan(for_gpu({key!r}))['ram_weights_gb']", plan["ram_weights_gb"])])
    check("README.md", "training peak for all 19 + 38 blocks (weights, IP-Adapter, LoRA, region and depth modules and "
          "their optimizer states, the cached depth features, activations; not the CUDA context): t4 {} GB, l4 {} GB, "
          "a100-40 {} GB, a100-80 and h100 {} GB", [at(peaks, calibration, k, "total_gb")
                                                   for k in ("t4", "l4", "a100-40", "a100-80")])
    assert peaks["a100-80"]["total_gb"] == peaks["h100"]["total_gb"], "README: a100-80 and h100 share one peak"
    t5 = plan["ram_gb"]["t5"]
    check("README.md", "and T5-XXL alone is about {} GB in 16 bits", [("kh.memory_plan(...)['ram_gb']['t5']", t5)])


def _bound_in_test(path: str, pattern: str) -> float:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        found = re.findall(pattern, f.read())
    assert len(found) == 1, f"{path}: expected one bound matching {pattern!r}, found {found}"
    return float(found[0])


def test_memory_estimate_bound_is_the_tests():
    bound = _bound_in_test("tests/test_memory.py", r"abs\(estimate - measured\) < ([\d.]+) \* measured")
    source = ("tests/test_memory.py: the bound of abs(estimate - measured) (x 100)", 100 * bound)
    check("README.md", "the estimator is within {}% (the test's bound)", [source])
    check("docs/design.md", "a test holds it within {}% of the measured peak RSS", [source])


def test_depth_step_cost_limit_is_the_benchmarks():
    with open(os.path.join(REPO, "benchmarks", "bench.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    limit = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(getattr(t, "id", None) == "DEPTH_COST_LIMIT" for t in node.targets))
    source = ("benchmarks/bench.py: DEPTH_COST_LIMIT", limit)
    check("README.md", "its step stays within {}x of the plain step", [source])
    check("docs/design.md", "(`make bench`: within {}x of the plain step)", [source])


def test_cpu_preset_steps_quoted_in_the_readme():
    import kontext_helpers as kh

    preset = kh.GPU_PRESETS["cpu"]
    sources = [("GPU_PRESETS['cpu']['steps']", preset["steps"]), ("GPU_PRESETS['cpu']['resolution']",
                                                                  preset["resolution"])]
    check("README.md", "the `cpu` preset: {} updates at {} px)", sources)
    check("README.md", "before and after the cpu preset's {}-step run of the tiny model (notebook 04, {} px)", sources)


def test_tiny_weights_file_size_quoted_in_the_readme():
    path = os.path.join(REPO, "kontext_helpers", "tiny_weights", "tiny_kontext.safetensors")
    check("README.md", "its weights ship with the package ({} MB, fp16)", [
        ("the size of kontext_helpers/tiny_weights/tiny_kontext.safetensors in MB", os.path.getsize(path) / 1e6)])


def test_tiny_model_recipe_quoted_in_its_document():
    import inspect

    import kontext_helpers as kh

    cfg, doc, name = kh.PretrainConfig(), "docs/tiny_model.md", "kh.PretrainConfig()"
    check(doc, "The {} pairs are rendered once at {} px", [(f"{name}.pairs", cfg.pairs),
                                                           (f"{name}.resolution", cfg.resolution)])
    check(doc, "L1 + MSE, {} updates on 64 px crops (batch {}), then {} on whole images (batch {})", [
        (f"{name}.vae_crop_steps", cfg.vae_crop_steps), (f"{name}.vae_batch_size", cfg.vae_batch_size),
        (f"{name}.vae_full_steps", cfg.vae_full_steps), (f"{name}.vae_full_batch_size", cfg.vae_full_batch_size)])
    probe_batch = inspect.signature(kh.pretrain._probe_loss).parameters["batch"].default
    check(doc, "**Depth probe: the image encoder alone** ({} updates, batch {},", [
        (f"{name}.probe_steps", cfg.probe_steps), ("kh.pretrain._probe_loss(batch=...)", probe_batch)])
    check(doc, "**Base transformer and IP-Adapter** ({} updates, batch {})", [
        (f"{name}.base_steps", cfg.base_steps), (f"{name}.batch_size", cfg.batch_size)])
    assert abs(cfg.long_text_fraction - 1 / 5) < 1e-9, f"{doc} says a fifth of the batches: {name}.long_text_fraction"
    check(doc, "Besides the drawn \"keep\" pairs, {}% of the samples become copies", [
        (f"{name}.keep_fraction (x 100)", 100 * cfg.keep_fraction)])
    assert abs(cfg.depth_fraction - 1 / 2) < 1e-9, f"{doc} says half of the batches see depth: {name}.depth_fraction"
    check(doc, "**VAE decoder** alone on whole images ({} updates, batch {})", [
        (f"{name}.decoder_steps", cfg.decoder_steps), (f"{name}.vae_full_batch_size", cfg.vae_full_batch_size)])


# --------------------------------------------------------------------------------------------------
# photos at their own shape: docs/bucket_heldout.json (and the smaller run, docs/bucket_heldout_small.json)
# --------------------------------------------------------------------------------------------------


def bucket(policy: str, *keys, source: str = "docs/bucket_heldout.json"):
    return at(read_json(source), source, "policies", policy, *keys)


def kept(policy: str):
    name, value = bucket(policy, "mask_kept")
    return name, 100 * value


@pytest.mark.parametrize("policy, row", [
    ("bucket", '| **`resize="bucket"` (the default)** | **{} dB** | **{} dB** | {}% |'),
    ("square", '| `resize="square"` (stretched) | {} dB | {} dB | {}% |'),
    ("crop", '| `resize="crop"` (centre square) | {} dB | {} dB | {}% |'),
])
def test_readme_bucket_table(policy, row):
    check("README.md", row, [bucket(policy, "held_out", "all", "in_db"), bucket(policy, "held_out", "all", "out_db"),
                             kept(policy)])


def test_readme_bucket_text():
    check("README.md", "({} dB outside with buckets against {} and {} dB)",
          [bucket(p, "held_out", "16x9", "out_db") for p in ("bucket", "square", "crop")])
    report = read_json("docs/bucket_heldout.json")
    check("README.md", "({} updates) three times on {} drawn scenes",
          [("steps", report["steps"]), ("train_scenes", report["train_scenes"])])
    check("README.md", "and edits {} held-out scenes at each one's own shape",
          [("held_out_scenes", report["held_out_scenes"])])


@pytest.mark.parametrize("policy", ["bucket", "square", "crop"])
def test_design_bucket_table(policy):
    cells = [bucket(policy, "held_out", "all", "in_db"), bucket(policy, "held_out", "all", "out_db")]
    for aspect in ("4x3", "3x4", "16x9"):
        cells += [bucket(policy, "held_out", aspect, "in_db"), bucket(policy, "held_out", aspect, "out_db")]
    check("docs/design.md", f'| `"{policy}"` | {{}} dB | {{}} dB | {{}} / {{}} | {{}} / {{}} | {{}} / {{}} | {{}}% |',
          cells + [kept(policy)])


def test_design_bucket_text():
    small = "docs/bucket_heldout_small.json"
    check("docs/design.md", "gave {} (bucket), {} (square) and {} dB (crop)",
          [bucket(p, "held_out", "all", "in_db", source=small) for p in ("bucket", "square", "crop")])
    check("docs/design.md", "**Crop** loses {}% of the training masks' pixels",
          [("100 - crop mask_kept", 100 - kept("crop")[1])])
    check("docs/design.md", "buckets lose {}%, the sliver", [("100 - bucket mask_kept", 100 - kept("bucket")[1])])


# --------------------------------------------------------------------------------------------------
# the step costs: docs/bench.json, one run of benchmarks/bench.py
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, row", [
    ("project", "| this project's default step (the `\"marked\"` region signal, depth per token, dual loss, L2) |"),
    ("project_bucket", "| the same step at a non-square bucket of the same area (144x112 px: 63 tokens against 64) |"),
    ("project_no_depth", "| this project's step without depth |"),
    ("project_no_region", "| this project's step without the region signal (depth per token) |"),
    ("project_ip_adapter", "| this project's step with the IP-Adapter depth kind instead |"),
    ("original", "| the original design's step (reads the files, T5 at 512 tokens, VAE and CLIP depth every step) |"),
])
def test_readme_step_cost_table(variant, row):
    steps = [at(read_json("docs/bench.json"), "docs/bench.json", "steps", variant, k)
             for k in ("median_ratio", "paired_ratio", "min_ratio")]
    check("README.md", row + " {}x | {}x | {}x |", steps)


def test_readme_step_cost_text():
    bench = read_json("docs/bench.json")
    check("README.md", "costs what the square step costs ({}x of it here",
          [at(bench, "docs/bench.json", "bucket_cost", "median_ratio")])
    ms = [at(bench, "docs/bench.json", "depth_cost", "real_width", i, "signal_ms") for i in (0, 2)]
    check("README.md", "the region and depth work ({} to {} ms at 256 to 1024 px)", ms)
