"""Environment assignments, risks, backdoor weights and invariance penalties against hand computations."""

from __future__ import annotations

import math

import pytest
import test_training_fixtures  # noqa: F401  (one torch thread: the test machine's 2 cores are shared)
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from causalrec.errors import ConfigError, DataError
from causalrec.training.environments import (
    EnvironmentModel,
    active_environments,
    adjusted_rand_index,
    assignment_entropy,
    backdoor_loss,
    balance_loss,
    cluster_loss,
    environment_risks,
    irm_penalty,
    irm_penalty_autograd,
    kmeans_plus_plus,
    label_assign,
    linear_probe,
    mmd_penalty,
    normalized_mutual_information,
    soft_assign,
    vrex_penalty,
)
from causalrec.training.losses import sdpo_loss_from_logits, sdpo_losses


def test_soft_assign_is_softmax_of_negative_squared_distance():
    h = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    q = soft_assign(h, c, tau=2.0)
    # row 0: d² = (0, 4) -> weights (1, e^-2); row 2: d² = (1, 1) -> (1/2, 1/2)
    assert q[0].tolist() == pytest.approx([1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))], abs=1e-6)
    assert q[1].tolist() == pytest.approx([math.exp(-2) / (1 + math.exp(-2)), 1 / (1 + math.exp(-2))], abs=1e-6)
    assert q[2].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def test_label_assign_one_hot_and_unseen_labels_uniform():
    q = label_assign(torch.tensor([2, 0, -1]), 3)
    assert q.tolist() == [[0, 0, 1], [1, 0, 0], [pytest.approx(1 / 3)] * 3]
    with pytest.raises(DataError):
        label_assign(torch.tensor([3]), 3)


def test_risks_and_backdoor_on_five_samples_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    hard = label_assign(torch.tensor([0, 0, 1, 1, 1]), 2)
    assert environment_risks(losses, hard).tolist() == pytest.approx([1.5, 4.0])
    # P(e) from the whole training set, not the batch (the batch has 2/5 vs 3/5)
    assert backdoor_loss(environment_risks(losses, hard), torch.tensor([0.25, 0.75])).item() == pytest.approx(
        0.25 * 1.5 + 0.75 * 4.0
    )
    soft = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.25, 0.75], [1.0, 0.0]])
    r0 = (1 * 1 + 0.5 * 2 + 0 * 3 + 0.25 * 4 + 1 * 5) / (1 + 0.5 + 0 + 0.25 + 1)
    r1 = (0 * 1 + 0.5 * 2 + 1 * 3 + 0.75 * 4 + 0 * 5) / (0 + 0.5 + 1 + 0.75 + 0)
    risks = environment_risks(losses, soft)
    assert risks.tolist() == pytest.approx([r0, r1])
    assert backdoor_loss(risks, torch.tensor([0.4, 0.6])).item() == pytest.approx(0.4 * r0 + 0.6 * r1)


def test_backdoor_renormalises_over_environments_present_in_the_batch():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    q = label_assign(torch.tensor([0, 0, 1, 1, 1]), 3)  # environment 2 absent from this batch
    mask = active_environments(q)
    assert mask.tolist() == [True, True, False]
    risks = environment_risks(losses, q)
    assert risks.tolist() == pytest.approx([1.5, 4.0, 0.0])
    prior = torch.tensor([0.2, 0.3, 0.5])
    assert backdoor_loss(risks, prior, mask).item() == pytest.approx((0.2 * 1.5 + 0.3 * 4.0) / 0.5)


def test_one_environment_gives_the_plain_mean():
    losses = torch.tensor([0.3, 1.7, 2.2])
    q = torch.ones(3, 1)
    assert backdoor_loss(environment_risks(losses, q), torch.ones(1)).item() == pytest.approx(losses.mean().item())
    assert vrex_penalty(environment_risks(losses, q)).item() == 0.0
    assert mmd_penalty(losses, q).item() == 0.0


def test_vrex_is_the_variance_of_active_risks():
    assert vrex_penalty(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    assert vrex_penalty(torch.tensor([1.0, 3.0])).item() == pytest.approx(1.0)  # ((1-2)² + (3-2)²) / 2
    masked = vrex_penalty(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False]))
    assert masked.item() == pytest.approx(1.0)


def test_mmd_zero_for_identical_distributions_positive_otherwise():
    q = label_assign(torch.tensor([0, 0, 1, 1]), 2)
    same = mmd_penalty(torch.tensor([1.0, 2.0, 2.0, 1.0]), q, bandwidths=(1.0,))
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    # env 0 = {0, 0}, env 1 = {3, 3}: MMD² = k(0,0) + k(3,3) - 2 k(0,3) = 2 - 2 exp(-9/2)
    apart = mmd_penalty(torch.tensor([0.0, 0.0, 3.0, 3.0]), q, bandwidths=(1.0,))
    assert apart.item() == pytest.approx(2 - 2 * math.exp(-4.5), rel=1e-5)
    # two bandwidths: the kernels add up
    two = mmd_penalty(torch.tensor([0.0, 0.0, 3.0, 3.0]), q, bandwidths=(1.0, 2.0))
    assert two.item() == pytest.approx(4 - 2 * math.exp(-4.5) - 2 * math.exp(-9 / 8), rel=1e-5)
    # soft assignments identical for every sample: environments see the same distribution
    uniform = torch.full((4, 2), 0.5)
    assert mmd_penalty(torch.tensor([0.0, 5.0, 1.0, 3.0]), uniform).item() == pytest.approx(0.0, abs=1e-6)
    # three environments: mean over the three pairs (e0 = e1 = {0}, e2 = {3})
    q3 = label_assign(torch.tensor([0, 1, 2]), 3)
    three = mmd_penalty(torch.tensor([0.0, 0.0, 3.0]), q3, bandwidths=(1.0,))
    assert three.item() == pytest.approx((0 + 2 * (2 - 2 * math.exp(-4.5))) / 3, rel=1e-5)
    with pytest.raises(ConfigError):
        mmd_penalty(torch.zeros(4), q, bandwidths=(0.0,))


def test_irm_closed_form_matches_autograd_and_hand_values():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    q = torch.softmax(torch.randn(6, 2), dim=-1)
    assert irm_penalty(logits, q).item() == pytest.approx(irm_penalty_autograd(logits, q).item(), rel=1e-5)
    # J = 1, one sample per environment: dl/ds = σ(z) z at s = 1
    z = torch.tensor([[1.0], [-2.0]])
    q2 = label_assign(torch.tensor([0, 1]), 2)
    g0, g1 = torch.sigmoid(torch.tensor(1.0)).item() * 1.0, torch.sigmoid(torch.tensor(-2.0)).item() * -2.0
    assert irm_penalty(z, q2).item() == pytest.approx((g0**2 + g1**2) / 2, rel=1e-5)
    # zero when every environment is at its stationary scale (margins 0), positive when environments differ
    assert irm_penalty(torch.zeros(4, 1), label_assign(torch.tensor([0, 0, 1, 1]), 2)).item() == 0.0
    differ = torch.tensor([[0.0], [0.0], [2.0], [2.0]])
    assert irm_penalty(differ, label_assign(torch.tensor([0, 0, 1, 1]), 2)).item() > 0.0


def test_sdpo_loss_by_hand():
    # β = 0.5; log-ratios: chosen 1.0, rejected (0.2, -1.0)
    loss = sdpo_losses(
        torch.tensor([1.5]), torch.tensor([[0.7, -0.5]]), torch.tensor([0.5]), torch.tensor([[0.5, 0.5]]), beta=0.5
    )
    inner = math.log(math.exp(0.5 * (0.2 - 1.0)) + math.exp(0.5 * (-1.0 - 1.0)))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(inner))), rel=1e-6)
    # J = 1 is the sigmoid DPO loss -log σ(β Δ)
    z = torch.tensor([[-0.8]])
    assert sdpo_loss_from_logits(z).item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.8))), rel=1e-6)


def test_balance_and_cluster_losses():
    assert balance_loss(torch.full((4, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)
    assert balance_loss(collapsed).item() == pytest.approx(math.log(4), rel=1e-5)
    h = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    c = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # row 0: 0; row 1: 0.5 * 25 + 0.5 * 16
    assert cluster_loss(h, c, q).item() == pytest.approx((0 + 0.5 * 25 + 0.5 * 16) / 2)


def test_assignment_and_balance_with_a_prior_by_hand():
    h = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    prior = torch.tensor([0.2, 0.8])
    q = soft_assign(h, c, tau=2.0, prior=prior)
    for i, d2 in enumerate(([0.0, 4.0], [1.0, 1.0])):
        w = [prior[e].item() * math.exp(-d2[e] / 2.0) for e in range(2)]
        assert q[i].tolist() == pytest.approx([w[0] / sum(w), w[1] / sum(w)], rel=1e-6)
    torch.testing.assert_close(soft_assign(h, c, 2.0, torch.tensor([0.5, 0.5])), soft_assign(h, c, 2.0))
    # KL(mean q || P): mean q = (0.5, 0.5), P = (0.2, 0.8)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert balance_loss(q, prior).item() == pytest.approx(expected, rel=1e-6)
    assert balance_loss(q, torch.tensor([0.5, 0.5])).item() == pytest.approx(balance_loss(q).item(), abs=1e-7)


def test_nmi_and_ari_equal_scikit_learn():
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.randint(4, (300,), generator=gen), torch.randint(3, (300,), generator=gen))]
    a = torch.randint(5, (200,), generator=gen)
    cases += [(a, (a * 7 + 3) % 5), (a, a.clamp(max=2)), (a, torch.where(torch.rand(200, generator=gen) < 0.3, 0, a))]
    cases += [(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 0])), (torch.tensor([0, 1, 2]), torch.zeros(3))]
    for x, y in cases:
        assert normalized_mutual_information(x, y) == pytest.approx(normalized_mutual_info_score(x, y), abs=1e-9)
        assert adjusted_rand_index(x, y) == pytest.approx(adjusted_rand_score(x, y), abs=1e-9)
    assert normalized_mutual_information(a, (a * 7 + 3) % 5) == pytest.approx(1.0)  # a renaming


@pytest.mark.parametrize("seed", [0, 1])
def test_estimated_prior_recovers_unequal_environments(seed):
    """Planted clusters of 60 / 25 / 15 %: balancing towards equal sizes (the paper's term) pulls rows of the large
    cluster into the small ones; the estimated prior lets the clusters keep the data's sizes."""

    def train(estimated: bool):
        gen = torch.Generator().manual_seed(seed)
        sizes, dim = [600, 250, 150], 32
        means = torch.randn(3, dim, generator=gen)
        labels = torch.cat([torch.full((n,), j) for j, n in enumerate(sizes)])
        h = means[labels] + torch.randn(len(labels), dim, generator=gen)
        env = EnvironmentModel(3, dim, tau=0.1, prior_momentum=0.95, estimated_prior=estimated)
        env.initialize(h[torch.randperm(len(h), generator=gen)[:512]], seed=1)
        optimizer = torch.optim.Adam(env.parameters(), lr=1e-2)
        for _ in range(300):
            batch = h[torch.randint(len(h), (32,), generator=gen)]
            q = env(batch)
            distortion, balance = env.clustering_losses(batch, q)
            optimizer.zero_grad()
            (distortion + balance).backward()
            optimizer.step()
            env.update_prior(q.detach())
        return adjusted_rand_index(env(h).argmax(1), labels), sorted(env.prior.tolist(), reverse=True)

    ari_uniform, _ = train(False)
    ari_estimated, prior = train(True)
    print(f"seed {seed}: ARI {ari_uniform:.3f} balanced to uniform, {ari_estimated:.3f} with the estimated prior")
    assert ari_estimated >= 0.95 and ari_uniform <= 0.8
    assert prior == pytest.approx([0.6, 0.25, 0.15], abs=0.05)


def test_prior_is_a_moving_average_of_assignments():
    env = EnvironmentModel(2, 3, prior_momentum=0.9)
    env.update_prior(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert env.prior.tolist() == pytest.approx([0.9 * 0.5 + 0.1 * 1.0, 0.9 * 0.5])


def test_environment_model_validation():
    with pytest.raises(ConfigError):
        EnvironmentModel(0, 4)
    with pytest.raises(ConfigError):
        EnvironmentModel(2, 4, tau=0.0)
    with pytest.raises(DataError):
        kmeans_plus_plus(torch.zeros(2, 3), 3)


def test_clustering_recovers_planted_environments():
    """Seeded from one batch by k-means++ only, then trained by the clustering losses alone. A large shared
    offset mimics the anisotropy of LLM hidden states (all pointing one way), which the standardisation removes."""
    gen = torch.Generator().manual_seed(0)
    k, dim, per = 4, 16, 150
    means = torch.randn(k, dim, generator=gen) * 3.0
    labels = torch.arange(k).repeat_interleave(per)
    h = means[labels] + torch.randn(k * per, dim, generator=gen) + 40.0
    order = torch.randperm(k * per, generator=gen)
    h, labels = h[order], labels[order]

    env = EnvironmentModel(k, dim, tau=0.05)
    env.initialize(h[:32], n_iter=0, seed=1)  # first batch, k-means++ seeding only
    ari_seed = adjusted_rand_score(labels.numpy(), env(h).argmax(1).numpy())
    optimizer = torch.optim.Adam(env.parameters(), lr=0.05)
    for step in range(150):
        batch = h[(step * 32) % (k * per) :][:32]
        q = env(batch)
        distortion, balance = env.clustering_losses(batch, q)
        optimizer.zero_grad()
        (distortion + balance).backward()
        optimizer.step()
    ari = adjusted_rand_score(labels.numpy(), env(h).argmax(1).numpy())
    print(f"adjusted Rand index: {ari_seed:.3f} after k-means++ seeding, {ari:.3f} after training")
    assert ari >= 0.9


def _train_prototypes(tau: float, k: int = 4, dim: int = 64, per: int = 200, steps: int = 200):
    """Overlapping clusters in a high-dimensional space (like an LLM's prompt states), clustering losses only."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(k, dim, generator=gen) * 0.35
    h = means[torch.arange(k).repeat_interleave(per)] + torch.randn(k * per, dim, generator=gen)
    env = EnvironmentModel(k, dim, tau=tau)
    env.initialize(h[:256], seed=1)
    optimizer = torch.optim.Adam(env.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = h[torch.randint(k * per, (32,), generator=gen)]
        distortion, balance = env.clustering_losses(batch, env(batch))
        optimizer.zero_grad()
        (distortion + balance).backward()
        optimizer.step()
    return assignment_entropy(env(h)).item(), torch.pdist(env.prototypes.detach()).min().item()


def test_default_tau_keeps_environments_apart():
    """With too soft a temperature the assignments are uniform, the distortion pulls every prototype to the mean
    and CausalDPO degenerates to S-DPO (seen on retail-sim with tau=1: identical metrics to 4 decimals)."""
    from causalrec.training.causal_dpo_config import CausalDPOConfig

    tau = CausalDPOConfig.__dataclass_fields__["tau"].default
    entropy, gap = _train_prototypes(tau)
    assert entropy < math.log(4) - 0.3 and gap > 0.1
    collapsed_entropy, collapsed_gap = _train_prototypes(1.0)
    assert collapsed_entropy == pytest.approx(math.log(4), abs=1e-3) and collapsed_gap < 0.05


def _u_statistic(values, groups, bandwidth=1.0):
    """Textbook unbiased MMD² between hard groups, by loops (Gretton et al. 2012, eq. 3), averaged over pairs."""
    k = lambda a, b: math.exp(-((a - b) ** 2) / (2 * bandwidth**2))  # noqa: E731
    names = sorted(set(groups))
    members = {g: [v for v, h in zip(values, groups) if h == g] for g in names}
    total, pairs = 0.0, 0
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            x, y = members[names[a]], members[names[b]]
            m, n = len(x), len(y)
            xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
            yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
            xy = sum(k(xi, yj) for xi in x for yj in y) / (m * n)
            total, pairs = total + xx + yy - 2 * xy, pairs + 1
    return total / pairs


def test_unbiased_mmd_is_the_u_statistic_and_does_not_penalise_size():
    values = [0.3, -1.2, 0.8, 2.0, 1.1, -0.4, 0.9, 0.0, 1.7]
    groups = [0, 0, 0, 1, 1, 1, 1, 2, 2]
    q = torch.nn.functional.one_hot(torch.tensor(groups), 3).double()
    got = mmd_penalty(torch.tensor(values, dtype=torch.float64), q, unbiased=True).item()
    assert got == pytest.approx(_u_statistic(values, groups), rel=1e-12)
    # The same distribution seen by a small (2) and a large (40) environment: the biased form charges them for their
    # sizes, E = (1/2 + 1/40)(1 - E k(x, x')) with E k = 1/sqrt(3) for N(0, 1) and sigma 1, i.e. 0.2220; the unbiased
    # one is 0 in expectation.
    gen = torch.Generator().manual_seed(0)
    biased, unbiased = [], []
    for _ in range(200):
        v = torch.randn(42, generator=gen, dtype=torch.float64)
        hard = torch.nn.functional.one_hot(torch.tensor([0] * 2 + [1] * 40), 2).double()
        biased.append(mmd_penalty(v, hard).item())
        unbiased.append(mmd_penalty(v, hard, unbiased=True).item())
    bias = (1 / 2 + 1 / 40) * (1 - 1 / math.sqrt(3))
    assert sum(biased) / 200 == pytest.approx(bias, abs=0.02) and abs(sum(unbiased) / 200) < 0.02


def test_unbiased_mmd_with_soft_weights_drops_self_pairs_and_too_small_environments():
    v = torch.tensor([0.0, 1.0, 2.5, -0.5], dtype=torch.float64)
    q = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    w = (q / q.sum(0)).t()
    kern = torch.exp(-((v[:, None] - v[None, :]) ** 2) / 2)

    def g(e, f):  # sum over i != j only, renormalised by the weight left
        num = sum(w[e, i] * w[f, j] * kern[i, j] for i in range(4) for j in range(4) if i != j)
        den = sum(w[e, i] * w[f, j] for i in range(4) for j in range(4) if i != j)
        return num / den

    expected = g(0, 0) + g(1, 1) - 2 * g(0, 1)
    assert mmd_penalty(v, q, unbiased=True).item() == pytest.approx(float(expected), rel=1e-12)
    one = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1]), 2).double()  # environment 0 has one sample
    assert mmd_penalty(v, one, unbiased=True).item() == 0.0
    assert mmd_penalty(v, one).item() > 0.0


def test_mmd_estimator_is_a_checked_setting(tmp_path):
    from causalrec.errors import UnknownNameError
    from causalrec.training import CausalDPOConfig

    assert CausalDPOConfig(str(tmp_path), mmd_estimator="unbiased").mmd_estimator == "unbiased"
    with pytest.raises(UnknownNameError, match="mmd_estimator"):
        CausalDPOConfig(str(tmp_path), mmd_estimator="fair")


def test_linear_probe_reaches_the_bayes_accuracy_and_chance_without_signal():
    """Two unit-variance Gaussians at -1 and +1 on the first of 8 dimensions: the Bayes classifier's accuracy is
    Phi(1) = 0.841; labels independent of x give the majority rate. Also equal to scikit-learn's logistic regression
    on the same halves (same penalty: C = 1 / (2 n_fit weight_decay))."""
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    n = 4000
    y = torch.randint(2, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen)
    x[:, 0] += 2.0 * y - 1.0
    accuracy, chance = linear_probe(x, y, seed=3)
    assert accuracy == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), abs=0.02)
    assert chance == pytest.approx(0.5, abs=0.03)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    fit, held = order[: n // 2], order[n // 2 :]
    reference = LogisticRegression(C=1 / (2 * len(fit) * 1e-3), max_iter=1000).fit(x[fit].numpy(), y[fit].numpy())
    assert accuracy == pytest.approx(reference.score(x[held].numpy(), y[held].numpy()), abs=0.005)
    noise = torch.randint(3, (n,), generator=gen)
    accuracy, chance = linear_probe(x, noise, seed=3)
    assert abs(accuracy - chance) < 0.04 and chance == pytest.approx(1 / 3, abs=0.03)
    with pytest.raises(DataError, match="at least 4 samples"):
        linear_probe(x[:3], y[:3])
