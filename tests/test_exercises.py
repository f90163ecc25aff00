"""The graded exercises: each checker passes the solution and rejects a plausible wrong answer with a message that
names what differs; a stub gets the message that says what to do; every notebook grades at least three."""

import glob
import os
import re

import jupytext
import pytest
import torch
import torch.nn.functional as F

import kontext_helpers as kh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "[0-9][0-9]_*.py")))
NAMES = list(kh.exercises.EXERCISES)


@pytest.fixture(autouse=True)
def learner_mode(monkeypatch):
    """As in Colab: a stub is not replaced by the solution unless a test asks for the headless run."""
    monkeypatch.delenv(kh.exercises.FILL_SOLUTIONS_ENV, raising=False)


def _check(name):
    return getattr(kh.exercises, f"check_{name}")


# ---- wrong answers a learner could plausibly write, one or more per exercise, and what the message must name


def _pack_channel_last(lat):
    b, c, h, w = lat.shape
    x = lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1)  # -> [B, H', W', 2, 2, C]: channel last
    return x.reshape(b, (h // 2) * (w // 2), c * 4)  # -> [B, N, 4C]


def _pack_channels_first(lat):
    return kh.exercises.solution("pack")(lat).transpose(1, 2)  # [B, N, 4C] -> [B, 4C, N]


def _unpack_rows_and_columns_swapped(tokens, h_tok, w_tok):
    b, _, c4 = tokens.shape
    x = tokens.view(b, h_tok, w_tok, c4 // 4, 2, 2).permute(0, 3, 2, 4, 1, 5)  # -> [B, C, W', 2, H', 2]
    return x.reshape(b, c4 // 4, h_tok * 2, w_tok * 2)  # -> [B, C, H_l, W_l], columns read as rows


def _ids_without_type(h_tok, w_tok):
    ids = kh.exercises.solution("image_ids")(h_tok, w_tok)
    ids[:, 0] = 0  # the context keeps type 0: it sits on the target's positions
    return ids


def _grid_max_for_area(mask, h_tok, w_tok, mode):
    return F.adaptive_max_pool2d(mask.float(), (h_tok, w_tok))  # max pooling whatever the mode


def _flow_swapped(x0, noise, sigma):
    s = sigma.reshape(-1, 1, 1)  # [B] -> [B, 1, 1]
    return s * x0 + (1 - s) * noise, noise - x0


def _flow_velocity_reversed(x0, noise, sigma):
    x_t, v = kh.exercises.solution("flow_matching")(x0, noise, sigma)
    return x_t, -v


def _flow_sigma_not_reshaped(x0, noise, sigma):
    return (1 - sigma) * x0 + sigma * noise, noise - x0  # [B] against [B, N, 4C]


def _loss_mean_over_all_tokens(pred, tgt, ctx, noise, mask_tok):
    m = mask_tok.reshape(pred.shape[0], -1, 1)  # [B, 1, H', W'] -> [B, N, 1]
    return (((pred - (noise - tgt)) ** 2 * m).mean(), ((pred - (noise - ctx)) ** 2 * (1 - m)).mean())


def _loss_outside_to_the_target(pred, tgt, ctx, noise, mask_tok):
    return kh.exercises.solution("masked_loss")(pred, tgt, tgt, noise, mask_tok)


def _sigmas_with_zero(u):
    return (u * 1000).floor() / 1000  # k / 1000 with k = 0..999: the terminal 0 included


def _blend_mask_inverted(latents, context, noise, mask_tok, sigma_next):
    return kh.exercises.solution("blend")(latents, context, noise, 1 - mask_tok, sigma_next)


def _blend_clean_context(latents, context, noise, mask_tok, sigma_next):
    return mask_tok * latents + (1 - mask_tok) * context  # the context never noised


def _euler_reversed(velocity, x, sigmas):
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s - s_next) * velocity(x, s)
    return x


def _euler_velocity_at_next(velocity, x, sigmas):
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * velocity(x, s_next)
    return x


def _euler_calls_at_zero(velocity, x, sigmas):
    x = kh.exercises.solution("euler_sample")(velocity, x, sigmas)
    velocity(x, sigmas[-1])  # one call too many, at the terminal 0
    return x


def _unshifted_sigmas(num_steps, image_seq_len, config):
    return torch.cat([torch.linspace(1.0, 1.0 / num_steps, num_steps), torch.zeros(1)])


def _sigmas_without_zero(num_steps, image_seq_len, config):
    return kh.exercises.solution("shifted_sigmas")(num_steps, image_seq_len, config)[:-1]


def _psnr_whole_image(pred, target, mask):
    return float(10 * torch.log10(1 / ((pred - target) ** 2).mean()))


def _psnr_masked_but_all_pixels(pred, target, mask):
    return float(10 * torch.log10(1 / (((pred - target) * mask) ** 2).mean()))


WRONG = [  # (exercise, wrong answer, a pattern the message must contain)
    ("binarize_mask", lambda grey, t: (grey > t).float(), r"threshold 0\.5 differs at index .* expected 1, got 0"),
    ("depth_near_one", lambda d: (d - d.min()) / (d.max() - d.min()), r"the map in metres differs .*Near = 1"),
    ("depth_near_one", lambda d: (d.max() - d) / (d.max() - d.min()), r"a constant map differs .* got nan"),
    ("mask_from_difference", lambda c, t, th, dl: ((c - t).abs().mean(0) > th).float()[None],
     r"threshold 0\.04, dilate 2 differs .*largest of the three channel"),
    ("mask_from_difference", lambda c, t, th, dl: ((c - t).abs().amax(0) > th).float()[None],
     r"threshold 0\.04, dilate 2 differs"),
    ("pack", _pack_channel_last, r"tokens of latents \[2, 16, 12, 20\] differs at index \[0, 0, 1\]"),
    ("pack", _pack_channels_first, r"should have shape \[2, 60, 64\], got \[2, 64, 60\]"),
    ("unpack", _unpack_rows_and_columns_swapped, r"6 x 10 grid differs at index"),
    ("image_ids", _ids_without_type, r"3 x 5 grid differs at index \[15, 0\]: expected 1, got 0"),
    ("image_ids", lambda h, w: kh.exercises.solution("image_ids")(w, h), r"should have shape|differs at index"),
    ("token_grid", _grid_max_for_area, r"mode 'area' on a 3 x 5 grid differs .*editable fraction"),
    ("flow_matching", _flow_swapped, r"x_t at sigma \(0\.9, 0\.25\) differs .*sigma 1 is pure noise"),
    ("flow_matching", _flow_velocity_reversed, r"the velocity v differs .*points from the clean latents"),
    ("flow_matching", _flow_sigma_not_reshaped, r"raised RuntimeError.*called with \(tensor \[2, 6, 64\]"),
    ("flow_matching", lambda x0, noise, sigma: (1 - sigma.reshape(-1, 1, 1)) * x0, r"return the pair \(x_t, v\)"),
    ("masked_loss", _loss_mean_over_all_tokens, r"loss_in with a mask of 0 and 1: expected .*divided by sum\(mask\)"),
    ("masked_loss", _loss_outside_to_the_target, r"loss_out with a mask of 0 and 1: expected .*noise - ctx"),
    ("training_sigmas", _sigmas_with_zero, r"sigma 0 for u = 0\.000.*k = 1\.\.1000"),
    ("training_sigmas", lambda u: u, r"the sigmas of uniform draws differs at index"),
    ("clean_estimate", lambda x_t, v, s: x_t + s.reshape(-1, 1, 1) * v, r"at sigma \(0\.8, 0\.3\) differs"),
    ("lora_mean_square", lambda d_in, d_out, r: d_in / r,  # the sum of squares, not the mean
     r"Linear\(1024 -> 1024\) at rank 16: PEFT's gaussian initialisation measures 0\.0019\d+, your formula gives 64"),
    ("lora_mean_square", lambda d_in, d_out, r: 1 / r**2,  # lora_B's zeros left out of the count
     r"measures 0\.0019\d+, your formula gives 0\.00390625.*entries of both"),
    ("shifted_sigmas", _unshifted_sigmas, r"4 steps at 256 tokens differs at index \[1\]"),
    ("shifted_sigmas", _sigmas_without_zero, r"should have shape \[5\], got \[4\]"),
    ("euler_sample", _euler_reversed, r"x after 6 steps differs"),
    ("euler_sample", _euler_velocity_at_next, r"x after 6 steps differs"),
    ("euler_sample", _euler_calls_at_zero, r"called 7 times for 6 steps"),
    ("blend", _blend_mask_inverted, r"after step 0 .* differs .*Inside the mask \(1\) the sampled latents"),
    ("blend", _blend_clean_context, r"after step 0 .* differs"),
    ("psnr_in_mask", _psnr_whole_image, r"PSNR inside the mask \(dB\): expected .*not the whole image"),
    ("psnr_in_mask", _psnr_masked_but_all_pixels, r"PSNR inside the mask \(dB\): expected"),
]


@pytest.mark.parametrize("name", NAMES)
def test_each_checker_passes_the_solution(name, capsys):
    _check(name)(kh.exercises.solution(name))
    assert f"✓ {name} passed" in capsys.readouterr().out, f"check_{name} must say that the solution passed"


@pytest.mark.parametrize("name, wrong, message", WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)])
def test_each_checker_rejects_a_wrong_answer_and_says_what_differs(name, wrong, message):
    with pytest.raises(AssertionError) as caught:
        _check(name)(wrong)
    text = str(caught.value)
    assert text.startswith(f"{name}: "), f"check_{name}'s message must name the exercise: {text}"
    assert re.search(message, text, flags=re.S), f"check_{name}'s message must match {message!r}, got: {text}"


def test_every_exercise_has_a_checker_a_solution_and_a_wrong_answer_it_rejects():
    checkers = {n[len("check_"):] for n in dir(kh.exercises) if n.startswith("check_")}
    assert checkers == set(NAMES), f"checkers and EXERCISES differ: {sorted(checkers ^ set(NAMES))}"
    assert all(callable(kh.exercises.solution(n)) for n in NAMES), "every exercise needs a solution"
    untried = set(NAMES) - {w[0] for w in WRONG}
    assert not untried, f"no wrong answer tried for {sorted(untried)}"


def test_a_stub_gets_the_message_that_says_what_to_do(capsys, monkeypatch):
    def stub(latents):
        raise NotImplementedError("your code here")

    with pytest.raises(NotImplementedError) as caught:
        kh.exercises.check_pack(stub)
    text = str(caught.value)
    assert "Exercise 'pack' is not done yet" in text and "kh.exercises.show_solution('pack')" in text, text
    monkeypatch.setenv(kh.exercises.FILL_SOLUTIONS_ENV, "1")  # a headless run: the solution is graded instead
    kh.exercises.check_pack(stub)
    out = capsys.readouterr().out
    assert "headless run" in out and "✓ pack passed" in out, f"a headless run must grade the solution: {out}"


def test_solutions_are_shown_and_returned_on_request(capsys):
    kh.exercises.show_solution("pack")
    shown = capsys.readouterr().out
    assert shown.startswith("def pack(") and "permute" in shown, f"show_solution prints the source: {shown}"
    with pytest.raises(KeyError, match="no exercise 'packing'"):
        kh.exercises.solution("packing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_every_notebook_grades_at_least_three_exercises_without_their_solutions(path):
    cells = [c.source for c in jupytext.read(path).cells if c.cell_type == "code"]
    checked = re.findall(r"kh\.exercises\.check_(\w+)\(", "\n".join(cells))
    assert len(checked) >= 3, f"{path} must grade at least three exercises, found {checked}"
    number = os.path.basename(path)[:2]
    own = {n for n, (notebook, _) in kh.exercises.EXERCISES.items() if notebook == number}
    assert sorted(checked) == sorted(own), f"{path} grades {sorted(checked)}, its exercises are {sorted(own)}"
    for name in checked:
        stubs = [c for c in cells if f"def {name}(" in c]
        assert len(stubs) == 1 and "raise NotImplementedError" in stubs[0], (
            f"{path}: exercise {name} needs one stub cell `def {name}(...)` that raises NotImplementedError")
    solutions = [c.splitlines()[0] for c in cells if c.startswith("# Solution")]
    assert not solutions, f"{path}: solutions belong in kh.exercises.show_solution, not in a cell: {solutions}"
