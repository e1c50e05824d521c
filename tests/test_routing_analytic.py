"""The ensemble against closed forms: a three-Gaussian mixture with exact partition velocities and posterior.

Data: x0 ~ sum_k pi_k N(mu_k, s^2 I) in 2-D, island k = component k. On the noise path x_t = a x0 + sigma eps
(a = 1 - sigma), x_t | k ~ N(a mu_k, v I) with v = a^2 s^2 + sigma^2, so
  expert k:  u_k(x) = E[eps - x0 | x_t = x, k] = ((sigma - a s^2) / v) (x - a mu_k) - mu_k
  router:    p(k | x_t = x) proportional to pi_k exp(-|x - a mu_k|^2 / (2 v))
and the mixture's velocity is sum_k p(k | x) u_k(x) (docs/design.md §2). The points travel as 2 x 1 x 1 "images".
"""
import math

import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from router.ensemble import DDMEnsemble
from router.pipeline import make_pipeline

PRIORS = torch.tensor([0.5, 0.3, 0.2])
MEANS = torch.tensor([[-0.6, 0.0], [0.6, 0.4], [0.0, -0.6]])
SPREAD = 0.08  # s: components far apart relative to their width, so the nearest mean names a sample's component
FLOW = {"shift": 1.0, "sigma_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0}
SHAPE = dict(sample_size=1, in_channels=2, out_channels=2, patch_size=1, num_embeds_ada_norm=1)


def path_terms(x, timestep):
    sigma = (timestep.float() / 1000).view(-1, 1)
    a = 1 - sigma
    return a, sigma, a**2 * SPREAD**2 + sigma**2


class GaussianExpert(nn.Module):
    def __init__(self, island: int):
        super().__init__()
        self.config = FrozenDict(SHAPE)
        self.mean = nn.Parameter(MEANS[island].clone(), requires_grad=False)

    def forward(self, hidden_states, timestep, class_labels=None, cross_attention_kwargs=None):
        x = hidden_states.flatten(1)
        a, sigma, v = path_terms(x, timestep)
        u = (sigma - a * SPREAD**2) / v * (x - a * self.mean) - self.mean
        return Transformer2DModelOutput(sample=u.view_as(hidden_states))


class GaussianRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = FrozenDict(num_experts=3, sample_size=1, in_channels=2, num_classes=None, flow=FLOW, manifest_fingerprint="gmm")
        self.register_buffer("means", MEANS.clone())

    def forward(self, hidden_states, timestep, class_labels=None):
        x = hidden_states.flatten(1)
        a, _, v = path_terms(x, timestep)
        return PRIORS.log() - ((x[:, None] - a[:, None] * self.means) ** 2).sum(-1) / (2 * v)


def ensemble(strategy: str, islands=(0, 1, 2)) -> DDMEnsemble:
    metas = [dict(island=k, k=3, num_classes=1, flow=FLOW, manifest_fingerprint="gmm") for k in islands]
    return DDMEnsemble(GaussianRouter(), [GaussianExpert(k) for k in islands], metas, strategy)


def exact_velocity(x, timestep, islands=(0, 1, 2)):
    """sum_k p(k | x) u_k(x) over the islands given, the posterior renormalized over them."""
    logits = GaussianRouter()(x, timestep)[:, list(islands)]
    velocities = torch.stack([GaussianExpert(k)(x, timestep).sample.flatten(1) for k in islands], 1)
    return (logits.softmax(1)[..., None] * velocities).sum(1)


def points(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 1, 1, generator=g) * 0.7, torch.rand(n, generator=g) * 1000


def test_full_is_the_exact_mixture_velocity():
    x, t = points()
    with torch.no_grad():
        out = ensemble("full")(x, t).sample.flatten(1)
    torch.testing.assert_close(out, exact_velocity(x, t), rtol=1e-5, atol=1e-5)
    # and not by accident: one expert alone is far from it at high noise
    assert (GaussianExpert(0)(x, t).sample.flatten(1) - exact_velocity(x, t)).abs().max() > 0.3


def test_a_missing_island_renormalizes_over_those_present():
    x, t = points()
    with torch.no_grad():
        ens = ensemble("full", islands=(0, 2))
        out = ens(x, t).sample.flatten(1)
    torch.testing.assert_close(out, exact_velocity(x, t, islands=(0, 2)), rtol=1e-5, atol=1e-5)
    w = ens.routing_weights[-1]
    assert (w[:, 1] == 0).all() and torch.allclose(w.sum(1), torch.ones(len(x)))


def component_fractions(strategy: str, n: int, steps: int, seed: int) -> torch.Tensor:
    pipe = make_pipeline(ensemble(strategy))
    images = pipe([0] * n, steps, 1.0, torch.Generator().manual_seed(seed), output_type="pt").images
    x = (images * 2 - 1).flatten(1)  # back from [0, 1]; the components lie well inside [-1, 1]
    nearest = torch.cdist(x, MEANS).argmin(1)
    return torch.bincount(nearest, minlength=3).float() / n


@pytest.mark.parametrize("strategy", ["full", "trajectory", "trajectory:0.5:full"])
def test_samples_keep_the_mixture_proportions(strategy):
    """Within 4 standard errors of the priors (binomial), with 4,000 samples and 50 Euler steps."""
    n = 4000
    frac = component_fractions(strategy, n, 50, seed=1)
    tolerance = 4 * (PRIORS * (1 - PRIORS) / n).sqrt()
    print(f"{strategy}: component fractions {[round(f, 3) for f in frac.tolist()]} (priors {PRIORS.tolist()})")
    assert ((frac - PRIORS).abs() < tolerance).all(), (strategy, frac.tolist())


def test_top1_proportions_are_measured():
    """Top-1 is biased towards the largest island (every trajectory starts where the prior is largest)."""
    n = 4000
    for steps in (50, 200):
        frac = component_fractions("top1", n, steps, seed=1)
        print(f"top1, {steps} steps: component fractions {[round(f, 3) for f in frac.tolist()]} (priors {PRIORS.tolist()})")
        assert math.isclose(frac.sum().item(), 1.0, rel_tol=1e-6)
        assert frac[0] > PRIORS[0] + 4 * math.sqrt(0.25 / n)  # the bias the issue measured (0.79 at these priors)
