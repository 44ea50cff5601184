"""The AR predictor's closed form: coefficients against NumPy's least squares, exact forecasts of
exactly autoregressive sequences (through steps with no record), and the predictor end to end."""
import math

import numpy as np
import pytest
import torch

from hf_vsa.autoregress import ar_fit, ar_weights
from hf_vsa.predictor import GradientPredictor


def lstsq_reference(records, times, order):
    """NumPy least squares of r_s on r_{s-1..s-order}, over every s whose lags are all recorded."""
    pos = {t: k for k, t in enumerate(times)}
    rows = [s for s in times if all(s - j in pos for j in range(1, order + 1))]
    x = np.concatenate([np.stack([records[pos[s - j]] for j in range(1, order + 1)], 1) for s in rows])
    y = np.concatenate([records[pos[s]] for s in rows])
    return np.linalg.lstsq(x, y, rcond=None)[0]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ar_coefficients_equal_numpy_lstsq_on_random_records(order):
    gen = np.random.default_rng(order)
    times = [0, 1, 2, 3, 4, 9, 10, 11]  # a gap: windows reaching into it are left out
    recs = [gen.standard_normal((len(times), d)) for d in (50, 7, 300)]
    gram = torch.stack([torch.tensor(r @ r.T) for r in recs])
    c = ar_fit(gram, times, order, ridge=0.0)
    for k, r in enumerate(recs):
        np.testing.assert_allclose(c[k].numpy(), lstsq_reference(r, times, order), rtol=1e-8, atol=1e-10)


def test_ridge_shrinks_and_degenerate_tensors_persist():
    times = list(range(6))
    r = np.random.default_rng(0).standard_normal((6, 40))
    gram = torch.stack([torch.tensor(r @ r.T), torch.zeros(6, 6, dtype=torch.float64)])
    free, ridged = ar_fit(gram, times, 2, ridge=0.0), ar_fit(gram, times, 2, ridge=10.0)
    assert ridged[0].norm() < free[0].norm()
    assert ridged[1].tolist() == [1.0, 0.0]  # an all-zero gradient: the last value persists
    # no complete lag window at all (records two steps apart, order 1)
    assert ar_fit(gram[:1], [0, 2, 4, 6, 8, 10], 1)[0].tolist() == [1.0]


def oscillation_plus_trend(n, d, seed=0, swing=1.0):
    """g_s = swing * a * (-1)^s + b + s * c / n: exactly AR(3) with coefficients (1, 1, -1)."""
    gen = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(3))
    return [swing * a * (-1) ** s + b + s * c / n for s in range(n)]


def test_exact_ar_sequence_is_forecast_exactly_several_steps_ahead_and_through_gaps():
    seq = oscillation_plus_trend(30, 64)
    times = [0, 1, 2, 3, 4, 5, 6, 12]  # a gap of five unrecorded steps before the newest record
    recs = torch.stack([seq[t] for t in times])
    c = ar_fit((recs @ recs.T)[None], times, 3, ridge=0.0)
    torch.testing.assert_close(c[0], torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    for t in (13, 14, 16, 20):  # 1 to 8 steps past the newest record
        w = ar_weights(c, times, t)[0]
        torch.testing.assert_close(w @ recs, seq[t], rtol=1e-9, atol=1e-9)
    assert torch.equal(ar_weights(c, times, 12)[0], torch.eye(len(times), dtype=torch.float64)[-1])


@pytest.mark.parametrize("compression", ["none", "ternary"])
def test_ar_predictor_follows_an_oscillation_that_wls_cannot(compression):
    seq = [x.float().view(8, 8) for x in oscillation_plus_trend(20, 64, seed=1, swing=2.0)]
    params = [torch.zeros(8, 8)]
    cos = {}
    for kind in ("ar", "wls"):
        pred = GradientPredictor(params, kind=kind, compression=compression, window=8, residual_decay=0.0,
                                 order=3, ridge=1e-9, block=16)
        for t in range(10):
            pred.record([seq[t]], t)
        out = [pred.predict(t)[0] for t in (10, 11, 12)]
        cos[kind] = [torch.nn.functional.cosine_similarity(o.flatten(), seq[t].flatten(), 0).item()
                     for o, t in zip(out, (10, 11, 12))]
    if compression == "none":  # exact records: exact forecasts
        assert min(cos["ar"]) > 1 - 1e-4
    else:  # ternary records (2 bits, error feedback): close, and far ahead of WLS
        assert min(cos["ar"]) > 0.7
    assert sum(cos["ar"]) - sum(cos["wls"]) > 3 * 0.3, cos  # a trend in time misses the swing


def test_ar_predictor_state_round_trips_and_refits_identically():
    seq = [x.float().view(4, 16) for x in oscillation_plus_trend(12, 64, seed=2)]
    params = [torch.zeros(4, 16)]
    a = GradientPredictor(params, kind="ar", compression="ternary", window=6, order=2, block=16)
    for t in range(8):
        a.record([seq[t]], t)
    b = GradientPredictor(params, kind="ar", compression="ternary", window=6, order=2, block=16)
    b.load_state_dict({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.state_dict().items()})
    for t in (8, 9, 11):
        assert torch.equal(a.predict(t)[0], b.predict(t)[0])
    assert not math.isnan(a.predict(9)[0].sum().item())
