"""The adversarial stage's parts: discriminators, their losses, the loss-ratio guard."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from training.discriminators import (Discriminators, discriminator_loss, feature_matching_loss, generator_loss,
                                     guard_ratio, split_verdicts)


def _verdicts(*logits: float) -> list:
    return [(torch.full((2, 1, 3, 1), v), [torch.full((2, 4), v)]) for v in logits]


@pytest.mark.parametrize("kind", ["hinge", "least_squares"])
def test_losses_are_zero_when_each_side_has_what_it_wants_and_positive_otherwise(kind):
    real, fake = (_verdicts(1.0, 1.0), _verdicts(-1.0, -1.0)) if kind == "hinge" else (_verdicts(1.0), _verdicts(0.0))
    assert float(discriminator_loss(real, fake, kind)) == 0.0
    assert float(discriminator_loss(fake, real, kind)) > 0.0  # the discriminators fooled
    if kind == "least_squares":
        assert float(generator_loss(_verdicts(1.0), kind)) == 0.0
        assert float(generator_loss(_verdicts(0.0), kind)) == 1.0
    else:  # hinge: the generator's loss is the negated fake logit, lower as it looks more real
        assert float(generator_loss(_verdicts(2.0), kind)) == -2.0


def test_feature_matching_is_the_mean_l1_distance_and_trains_the_generator_only():
    real = [(torch.zeros(1), [torch.zeros(3, requires_grad=True), torch.ones(2, requires_grad=True)])]
    fake_feats = [torch.full((3,), 0.5, requires_grad=True), torch.full((2,), 3.0, requires_grad=True)]
    loss = feature_matching_loss(real, [(torch.zeros(1), fake_feats)])
    assert float(loss.detach()) == pytest.approx((0.5 + 2.0) / 2)
    loss.backward()
    assert all(f.grad is not None for f in fake_feats)
    assert all(r.grad is None for r in real[0][1])


def test_the_guard_caps_the_adversarial_loss_at_its_ratio_and_scales_its_gradient():
    recon = torch.tensor(2.0, requires_grad=True)
    big = torch.tensor(10.0, requires_grad=True)
    capped = guard_ratio(big, recon, 0.5)
    assert float(capped.detach()) == pytest.approx(1.0)  # 0.5 x the reconstruction loss
    capped.backward()
    assert float(big.grad) == pytest.approx(0.1) and recon.grad is None  # the scale carries no gradient
    small = torch.tensor(0.4, requires_grad=True)
    kept = guard_ratio(small, recon, 0.5)
    kept.backward()
    assert float(kept.detach()) == pytest.approx(0.4) and float(small.grad) == pytest.approx(1.0)


@pytest.mark.parametrize("norm", ["weight", "spectral"])
def test_every_discriminator_layer_is_normalised_and_verdicts_split_by_example(norm):
    torch.manual_seed(0)
    discs = Discriminators([2, 3], [256], channels=4, norm=norm)
    convs = [m for m in discs.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(c, "weight") for c in convs)
    kinds = {type(p).__name__ for c in convs for p in c.parametrizations.weight}
    assert kinds == ({"_WeightNorm"} if norm == "weight" else {"_SpectralNorm"})
    if norm == "spectral":
        discs.train()
        for _ in range(60):  # one power iteration per use of a layer in training mode
            discs(torch.randn(1, 1, 512))
        for c in convs:
            assert torch.linalg.matrix_norm(c.weight.flatten(1), ord=2) <= 1.05
    x = torch.randn(3, 1, 2048)
    together = discs(x)
    first, rest = split_verdicts(together, 2)
    assert len(together) == 3
    for (logits_a, feats_a), (logits_b, feats_b), (logits, feats) in zip(first, rest, together):
        assert torch.equal(torch.cat([logits_a, logits_b]), logits)
        assert all(torch.equal(torch.cat([a, b]), f) for a, b, f in zip(feats_a, feats_b, feats))
