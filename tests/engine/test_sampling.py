"""Batched on-device sampling: per-row settings, counter-based noise that makes a seed's tokens independent of the
batch around it, and draws that follow the distribution they claim."""

from __future__ import annotations

import torch

from serve_app.engine.params import SamplingParams
from serve_app.engine.sampling import SamplingTensors, gumbel_noise, mix32, row_keys, sample

VOCAB = 50


def logits_for(rows: int, seed: int) -> torch.Tensor:
    return 2 * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def draw(logits, params, seeds, positions, device="cpu"):
    settings = SamplingTensors.build(params, seeds, VOCAB, device)
    return sample(logits.to(device), settings, torch.tensor(positions, device=device)).tolist()


def test_a_rows_token_depends_only_on_its_own_logits_seed_and_position():
    logits = logits_for(6, 0)
    params = [SamplingParams(temperature=0.9, top_p=0.7), SamplingParams(), SamplingParams(temperature=1.3),
              SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=1.0, top_p=0.95, top_k=10),
              SamplingParams(temperature=0.95, top_p=0.7)]
    seeds, positions = [11, 0, 12, 13, 14, 15], [7, 3, 9, 100, 5, 7]
    together = draw(logits, params, seeds, positions)
    alone = [draw(logits[i : i + 1], [params[i]], [seeds[i]], [positions[i]])[0] for i in range(6)]
    reordered = draw(logits.flip(0), params[::-1], seeds[::-1], positions[::-1])[::-1]
    assert together == alone == reordered
    assert together[1] == int(logits[1].argmax())  # the greedy row


def test_seed_and_position_drive_the_noise():
    keys = row_keys(torch.tensor([1, 1, 2]), torch.tensor([0, 0, 0]), torch.tensor([5, 6, 5]))
    noise = gumbel_noise(keys, 1000)
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(gumbel_noise(keys[:1], 1000)[0], noise[0])
    # Integer hash: every value stays in [0, 2**32) (no int64 overflow on any device).
    x = mix32(torch.tensor([0, 1, 2**32 - 1, 123456789]))
    assert bool(((x >= 0) & (x < 2**32)).all())


def test_sampled_frequencies_follow_the_kept_distribution():
    """Gumbel-max over 4000 positions matches softmax(logits / T) restricted to the top_p nucleus."""
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1] + [1e-9] * (VOCAB - 4)))
    params = SamplingParams(temperature=1.0, top_p=0.85)  # nucleus: the first three tokens
    n = 4000
    tokens = draw(logits.expand(n, -1), [params] * n, [42] * n, list(range(n)))
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB).float() / n
    expected = torch.tensor([0.4, 0.3, 0.2]) / 0.9
    assert counts[3:].sum() == 0
    assert (counts[:3] - expected).abs().max() < 0.03  # ~4 standard deviations at n=4000


def test_non_finite_rows_come_back_as_minus_one():
    logits = logits_for(3, 1)
    logits[1, 4] = float("nan")
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(), SamplingParams(temperature=0.5, top_p=0.5)]
    ids = draw(logits, params, [1, 2, 3], [0, 0, 0])
    assert ids[1] == -1 and ids[0] >= 0 and ids[2] >= 0


def test_noise_bits_are_the_same_on_every_device():
    """The hash is integer arithmetic: the same (seed, position) gives the same bits wherever it runs. On a CUDA
    machine this compares CPU and GPU; here it compares two CPU computations of differently shaped batches."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    keys = [row_keys(torch.tensor([7, 9], device=d), torch.tensor([3, 0], device=d), torch.tensor([10, 11], device=d))
            for d in devices]
    bits = [mix32(k[:, None] ^ torch.arange(VOCAB, device=k.device)[None]).cpu() for k in keys]
    assert all(torch.equal(bits[0], b) for b in bits)
    alone = row_keys(torch.tensor([9]), torch.tensor([0]), torch.tensor([11]))
    assert alone.item() == keys[0][1].item()


def test_candidates_give_the_full_sorts_tokens_and_overflow_falls_back():
    """top_p over the first K sorted candidates picks what the full sort picks; a nucleus wider than K comes back
    as OVERFLOW and resample_overflow draws it over the whole vocabulary."""
    from serve_app.engine.sampling import OVERFLOW, resample_overflow

    peaked, flat = logits_for(4, 2) * 3, torch.zeros(4, VOCAB)
    params = [SamplingParams(temperature=0.95, top_p=0.7)] * 4
    seeds, positions = [1, 2, 3, 4], torch.tensor([5, 6, 7, 8])
    settings = SamplingTensors.build(params, seeds, VOCAB, "cpu")
    full = sample(peaked, settings, positions, candidates=None).tolist()
    assert sample(peaked, settings, positions, candidates=20).tolist() == full
    overflow = sample(flat, settings, positions, candidates=10).tolist()
    assert overflow == [OVERFLOW] * 4
    assert resample_overflow(overflow, flat, settings, positions) == sample(flat, settings, positions,
                                                                            candidates=None).tolist()


def test_top_k_keeps_the_tokens_transformers_top_k_warper_keeps():
    """The candidate set per row (nucleus_drop with top_p 1) is the set transformers' TopKLogitsWarper leaves finite,
    for each row's own k; and draws at temperature 1 never leave it."""
    from transformers import TopKLogitsWarper

    from serve_app.engine.sampling import nucleus_drop

    logits = logits_for(4, 3)
    ks = [1, 3, 7, VOCAB]
    ordered, order = logits.sort(-1, descending=True)
    drop = nucleus_drop(ordered, torch.ones(4), torch.tensor(ks))
    for row, k in enumerate(ks):
        ours = set(order[row][~drop[row]].tolist())
        warped = TopKLogitsWarper(top_k=k)(None, logits[row : row + 1].clone())[0]
        assert ours == set(torch.isfinite(warped).nonzero()[:, 0].tolist()) and len(ours) == k
        drawn = {draw(logits[row : row + 1], [SamplingParams(temperature=1.0, top_k=k)], [seed], [0])[0]
                 for seed in range(200)}
        assert drawn <= ours and (k == 1 or len(drawn) > 1)


def test_top_k_then_top_p_keeps_what_transformers_warpers_keep():
    """top_p applies to what top_k leaves, renormalized: the kept set equals transformers' TopKLogitsWarper then
    TopPLogitsWarper (their order in `generate`) on the same logits."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from serve_app.engine.sampling import nucleus_drop

    cases = [(5, 0.5), (10, 0.9), (3, 0.99), (VOCAB, 0.7), (20, 0.3), (1, 0.5), (8, 0.75)]
    logits = logits_for(len(cases), 5)
    ordered, order = logits.sort(-1, descending=True)
    drop = nucleus_drop(ordered, torch.tensor([p for _, p in cases]), torch.tensor([k for k, _ in cases]))
    renormalized_differs = False
    for row, (k, p) in enumerate(cases):
        warped = TopPLogitsWarper(top_p=p)(None, TopKLogitsWarper(top_k=k)(None, logits[row : row + 1].clone()))[0]
        expected = set(torch.isfinite(warped).nonzero()[:, 0].tolist())
        assert set(order[row][~drop[row]].tolist()) == expected, (k, p)
        whole_row = TopPLogitsWarper(top_p=p)(None, logits[row : row + 1].clone())[0]  # top_p before top_k
        renormalized_differs |= len(expected) < min(k, int(torch.isfinite(whole_row).sum()))
    assert renormalized_differs  # some case tells the two orders apart


def test_a_top_k_past_the_candidates_draws_as_over_the_whole_vocabulary():
    """Only `candidates` tokens are sorted; a row whose top_k reaches past them and whose renormalized nucleus they
    cannot settle is drawn again over the whole vocabulary, so the tokens equal a draw without the shortcut."""
    from serve_app.engine.sampling import resample_overflow

    logits = logits_for(8, 9) / 4  # flat: the nuclei are wide
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p) for k, p in
              [(12, 0.9), (30, 0.5), (6, 0.95), (40, 0.99), (0, 0.6), (10, 0.2), (25, 0.8), (45, 0.7)]]
    positions = torch.arange(8)
    for seed in range(20):
        settings = SamplingTensors.build(params, [seed * 8 + i for i in range(8)], VOCAB, "cpu")
        short = resample_overflow(sample(logits, settings, positions, candidates=8).tolist(), logits, settings,
                                  positions)
        assert short == sample(logits, settings, positions, candidates=None).tolist()


def test_min_p_keeps_what_transformers_min_p_warper_keeps_after_top_k_and_top_p():
    """min_p drops tokens less than min_p times as likely as the top one; with top_k and top_p as well, the kept set
    equals transformers' TopK, TopP and MinP warpers in that order (generate's). Draws stay inside it."""
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from serve_app.engine.sampling import nucleus_drop

    cases = [(0.05, 0, 1.0), (0.3, 0, 1.0), (0.1, 10, 0.9), (0.01, 4, 0.95), (1.0, 0, 1.0), (0.2, 20, 0.5)]
    logits = logits_for(len(cases), 11)
    ordered, order = logits.sort(-1, descending=True)
    ks = torch.tensor([k or VOCAB for _, k, _ in cases])
    drop = nucleus_drop(ordered, torch.tensor([p for *_, p in cases]), ks, min_p=torch.tensor([m for m, *_ in cases]))
    for row, (min_p, k, top_p) in enumerate(cases):
        scores = logits[row : row + 1].clone()
        if k:
            scores = TopKLogitsWarper(top_k=k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p=top_p)(None, scores)
        scores = MinPLogitsWarper(min_p=min_p)(None, scores)[0]
        kept = set(order[row][~drop[row]].tolist())
        assert kept == set(torch.isfinite(scores).nonzero()[:, 0].tolist()), (min_p, k, top_p)
        params = [SamplingParams(temperature=1.0, top_k=k, top_p=top_p, min_p=min_p)]
        assert {draw(logits[row : row + 1], params, [seed], [0])[0] for seed in range(100)} <= kept


def test_logit_bias_draws_as_transformers_sequence_bias_applied_first():
    """logit_bias is added to the logits before temperature and the filters, for greedy rows too: the tokens equal
    the draws of the same settings on logits that transformers' SequenceBiasLogitsProcessor biased."""
    from transformers import SequenceBiasLogitsProcessor

    logits = logits_for(4, 21)
    bias = ((3, 5.0), (17, -100.0), (int(logits[2].argmax()), -4.5), (40, 2.5))
    processor = SequenceBiasLogitsProcessor(sequence_bias=[[[token], value] for token, value in bias])
    biased = processor(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    settings = [SamplingParams(), SamplingParams(temperature=0.8), SamplingParams(temperature=1.1, top_k=9),
                SamplingParams(temperature=0.9, top_p=0.8, min_p=0.02)]
    for seed in range(30):
        seeds, positions = [seed * 4 + i for i in range(4)], [5, 6, 7, 8]
        with_bias = draw(logits, [SamplingParams(**{**p.__dict__, "logit_bias": bias}) for p in settings], seeds,
                         positions)
        assert with_bias == draw(biased, settings, seeds, positions)
    assert draw(logits[:1], [SamplingParams(logit_bias=((11, 100.0),))], [0], [0]) == [11]


def test_a_row_short_of_min_tokens_never_draws_its_stop_ids():
    """The runner bans a row's stop ids while it is short of min_tokens (`suppress`): the draws equal those on logits
    that transformers' MinNewTokensLengthLogitsProcessor masked, and never hit a banned id."""
    from transformers import MinNewTokensLengthLogitsProcessor

    logits = logits_for(2, 4)
    stops = [int(logits[0].argmax()), int(logits[1].argmax()), 9]
    processor = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=0, min_new_tokens=5, eos_token_id=stops)
    # its -inf made finite: the reference draw treats non-finite logits as a model failure
    masked = processor(torch.zeros(2, 2, dtype=torch.long), logits.clone()).clamp(min=-1e30)
    params = [SamplingParams(), SamplingParams(temperature=1.3)]
    for seed in range(40):
        settings = SamplingTensors.build(params, [seed, seed + 1], VOCAB, "cpu", suppress=[stops, stops])
        got = sample(logits, settings, torch.tensor([3, 3])).tolist()
        assert got == draw(masked, params, [seed, seed + 1], [3, 3]) and not set(got) & set(stops)
