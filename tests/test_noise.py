"""The online gradient noise scale: unbiased on synthetic gradients of known mean and covariance,
read from real micro-batch gradients through hooks, and the lag-1 fallback."""
import math

import torch

from hf_vsa.noise import NoiseScale, mean_share, noise_terms
from hf_vsa.policy import micro_batches_needed


def test_noise_terms_are_unbiased_on_synthetic_gradients_with_known_mean_and_covariance():
    gen = torch.Generator().manual_seed(0)
    d, k, trials = 200, 8, 4000
    mean = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3
    sd = torch.rand(d, generator=gen, dtype=torch.float64) * 2  # diagonal covariance of one example
    b = 4  # examples per micro-batch: each micro gradient has covariance diag(sd^2) / b
    micro = mean + torch.randn(trials, k, d, generator=gen, dtype=torch.float64) * sd / math.sqrt(b)
    small = micro.pow(2).sum(-1).mean(-1)  # per trial: mean over micro-batches of |g_b|^2
    big = micro.mean(1).pow(2).sum(-1)  # |g_{kb}|^2
    g2, trace = noise_terms(small, big, b, k * b)
    true_g2, true_trace = mean.pow(2).sum().item(), sd.pow(2).sum().item()
    # the means over trials agree within a few standard errors
    for est, true in ((g2, true_g2), (trace, true_trace)):
        assert abs(est.mean().item() - true) < 4 * est.std().item() / math.sqrt(trials), (est.mean(), true)
    kappa = mean_share(true_g2, true_trace, k * b)
    assert 0 < kappa < 1 and math.isclose(kappa, 1 / (1 + (true_trace / true_g2) / (k * b)))


def test_the_first_micro_batch_and_the_step_gradient_give_the_estimate_of_the_formula():
    """No hook: .grad after the first micro-batch (one micro-batch's gradient) and after the last (the
    step's mean) are the two batch sizes."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    params = list(model.parameters())
    k = 4
    ns = NoiseScale(params, accum=k, world=1, batch=3, device="cpu")
    sqs = []
    for step in range(3):
        ns.listening = True
        model.zero_grad()
        for j in range(k):
            x, y = torch.randn(3, 6), torch.randn(3, 1)
            (torch.nn.functional.mse_loss(model(x), y) / k).backward()
            if j == 0:
                first = k * k * sum(p.grad.pow(2).sum().item() for p in params)
                ns.first([p.grad for p in params])
        sqs.append((first, sum(p.grad.pow(2).sum().item() for p in params)))
        ns.listening = False
        ns.observe(step, [p.grad for p in params])
    # running means over 3 measurements: plain means of the per-step unbiased estimates
    per_step = [noise_terms(s, b, 1.0, k) for s, b in sqs]
    g2, trace = (sum(x[j] for x in per_step) / 3 for j in (0, 1))
    assert math.isclose(ns.g2.sum().item(), g2, rel_tol=1e-6) and math.isclose(ns.trace.sum().item(), trace, rel_tol=1e-6)
    kappa, b_noise, ratio = ns.estimate()
    assert math.isclose(kappa, mean_share(g2, trace, k), rel_tol=1e-6)
    if g2 > 0:
        assert math.isclose(ratio, k * 3 / b_noise, rel_tol=1e-9)
    # not listening (a PREDICT step's partial backward): the first micro-batch reads nothing
    ns.first([p.grad for p in params])
    assert ns.first_sq is None


def test_fewer_computed_micro_batches_estimate_the_same_terms():
    """Adaptive accumulation computes m of K micro-batches and rescales the sum by K / m: the
    per-step estimate uses n = m gradients and stays unbiased."""
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(100))
    mean, sd, k, m = torch.randn(100, generator=gen) * 0.2, 1.0, 8, 3
    ns = NoiseScale([p], accum=k, world=1, batch=1, device="cpu")
    g2s, traces = [], []
    for step in range(400):
        ns.listening = True
        total = torch.zeros(100)
        for j in range(m):
            a = (mean + sd * torch.randn(100, generator=gen)) / k  # the Trainer's 1/K loss scaling
            total += a
            if j == 0:
                ns.first([total])
        ns.listening = False
        ns.measured = 0  # each step on its own: collect the per-step estimates
        ns.observe(step, [total * (k / m)], computed=m, scale=k / m)
        g2s.append(ns.g2.sum().item())
        traces.append(ns.trace.sum().item())
    est_g2, est_tr = sum(g2s) / len(g2s), sum(traces) / len(traces)
    assert abs(est_g2 - mean.pow(2).sum().item()) < 0.15 * mean.pow(2).sum().item()
    assert abs(est_tr - 100 * sd ** 2) < 0.05 * 100 * sd ** 2


def test_micro_batches_needed_follows_the_steps_law():
    # B_noise far below a micro-batch: the fewest; far above the full batch: all of them
    assert micro_batches_needed(0.001, 8, 2, 0.05) == 2
    assert micro_batches_needed(50.0, 8, 2, 0.05) == 8
    assert micro_batches_needed(float("nan"), 8, 2, 0.05) == 8
    for noise in (0.05, 0.3, 1.0, 3.0):
        m = micro_batches_needed(noise, 8, 1, 0.05)
        steps = lambda b: 1 + noise / b  # noqa: E731
        assert steps(m) <= 1.05 * steps(8) + 1e-12  # within tolerance...
        assert m == 1 or steps(m - 1) > 1.05 * steps(8)  # ...and the fewest that are


def test_one_gradient_per_step_reads_kappa_from_the_lag1_cosine():
    p = torch.nn.Parameter(torch.zeros(50))
    ns = NoiseScale([p], accum=1, world=1, batch=8, device="cpu")
    assert math.isnan(ns.estimate()[0])
    base = torch.randn(50)
    for step in range(6):  # identical gradients: everything is the mean
        p.grad = base.clone()
        ns.observe(step, [p.grad])
    kappa, b_noise, ratio = ns.estimate()
    assert kappa > 0.999 and b_noise < 1e-2
    for step in range(6, 40):  # independent gradients: nothing is (lag-1 cosine about 0)
        p.grad = torch.randn(50)
        ns.observe(step, [p.grad])
    assert ns.estimate()[0] < 0.3


def test_bf16_gradients_norms_are_taken_in_float32():
    from hf_vsa.noise import squared_norms
    g = torch.randn(100_000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact = g.double().pow(2).sum().item()
    assert math.isclose(squared_norms([g])[0].item(), exact, rel_tol=1e-5)
