"""What each update draws: a function of the seed and the update's number alone (so a resumed run draws the same)."""

import torch

import kontext_helpers as kh


def test_each_batch_comes_from_one_bucket_and_each_sample_comes_every_epoch():
    groups = [[0, 2, 4], [1, 3], [5]]
    per_epoch = 2 + 1 + 1  # batches of 2: ceil(3/2) + ceil(2/2) + ceil(1/2)
    for epoch in range(3):
        batches = [kh.batch_indices(groups, 7, epoch * per_epoch + k, 2) for k in range(per_epoch)]
        for b in batches:
            assert len(b) == 2 and any(set(b) <= set(g) for g in groups), f"epoch {epoch}: {b} mixes buckets"
        assert set(sum(batches, [])) == set(range(6)), f"epoch {epoch}: every sample comes: {batches}"
    assert kh.batch_indices(groups, 7, 5, 2) == kh.batch_indices(groups, 7, 5, 2), "a batch depends on its number"
    assert [kh.batch_indices([list(range(5))], 3, k, 1) for k in range(7)] == [
        kh.sample_indices(5, 3, k, 1) for k in range(7)], "one bucket: the stream of sample_indices, unchanged"


def test_step_generator_depends_on_the_seed_and_every_key():
    draws = {keys: torch.randn(3, generator=kh.step_generator(7, *keys)) for keys in ((2, 0), (2, 1), (3, 0))}
    again = torch.randn(3, generator=kh.step_generator(7, 2, 0))
    torch.testing.assert_close(again, draws[2, 0], msg="the same seed and keys draw the same numbers")
    assert not torch.equal(draws[2, 0], draws[2, 1]) and not torch.equal(draws[2, 0], draws[3, 0]), (
        "another update or another kind of draw gets other numbers")
    other_seed = torch.randn(3, generator=kh.step_generator(8, 2, 0))
    assert not torch.equal(other_seed, draws[2, 0]), "another seed gets other numbers"


def test_sigmas_are_training_sigmas_of_the_scheduler_table():
    cfg = kh.TrainConfig()
    sigma = kh.sample_sigmas(256, cfg, kh.step_generator(0, 2, 0))
    k = sigma * 1000
    torch.testing.assert_close(k, k.round(), msg="each sigma is k / 1000 of the 1000-step table")
    assert float(sigma.min()) >= 0.001 and float(sigma.max()) <= 1.0, f"sigmas in (0, 1]: {sigma.min()}, {sigma.max()}"
