import numpy as np
import pytest
import torch

from hf_vsa import GradientPredictor
from hf_vsa.fits import wls_coefficients


def make(shapes=((3, 4), (5,)), **kw):
    params = [torch.zeros(s) for s in shapes]
    return params, GradientPredictor(params, **kw)


def test_wls_matches_numpy_weighted_lstsq():
    rng = np.random.default_rng(0)
    times = [0, 1, 3, 4, 7, 8, 9, 14]
    hist = [rng.normal(size=(3, 4)) for _ in times]
    decay, t_pred = 0.9, 19
    params, pred = make(shapes=((3, 4),), decay=decay, residual_decay=0.0)
    for t, g in zip(times, hist):
        pred.record([torch.tensor(g, dtype=torch.float32)], t)
    got = pred.predict(t_pred)[0].numpy()
    # Reference: per element, weighted least squares of g(t) = b + v t, weights decay**(T - t).
    w = np.array([decay ** (times[-1] - t) for t in times])
    A = np.stack([np.ones(len(times)), np.array(times, float)], 1) * np.sqrt(w)[:, None]
    Y = np.stack([h.ravel() for h in hist]) * np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(A, Y, rcond=None)
    ref = (coef[0] + coef[1] * t_pred).reshape(3, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_exactly_linear_gradients_are_predicted_exactly():
    base, vel = torch.randn(6), torch.randn(6)
    params, pred = make(shapes=((6,),), decay=0.8, residual_decay=0.0)
    for t in (2, 3, 5, 6):
        pred.record([base + vel * t], t)
    for t in (7, 10, 30):
        torch.testing.assert_close(pred.predict(t)[0], base + vel * t, rtol=1e-4, atol=1e-4)


def test_single_record_predicts_that_gradient_and_none_predicts_zero():
    params, pred = make(residual_decay=0.0)
    assert all(torch.count_nonzero(p) == 0 for p in pred.predict(5))
    g = [torch.randn(3, 4), torch.randn(5)]
    pred.record(g, 0)
    for a, b in zip(pred.predict(4), g):
        torch.testing.assert_close(a, b)


def test_coefficients_fall_back_to_mean_when_degenerate():
    assert wls_coefficients(2.0, 0.0, 0.0, 3.0) == (0.5, 0.0)  # two records at one time: their mean
    assert wls_coefficients(0.0, 0.0, 0.0, 3.0) == (0.0, 0.0)  # nothing recorded: zero


def test_momentum_is_bias_corrected_ema():
    params, pred = make(shapes=((4,),), kind="momentum", momentum=0.9, residual_decay=0.0)
    gs = [torch.randn(4) for _ in range(5)]
    m = torch.zeros(4)
    for t, g in enumerate(gs):
        pred.record([g], t)
        m = 0.9 * m + 0.1 * g
    torch.testing.assert_close(pred.predict(9)[0], m / (1 - 0.9 ** 5))


@pytest.mark.parametrize("kind", ["wls", "momentum"])
def test_non_finite_gradients_are_recorded_as_zeros_and_counted_without_a_host_read(kind):
    """An fp16 overflow's gradient is decided on the device: recorded as zeros, counted in `skipped`."""
    params, pred = make(kind=kind, residual_decay=0.0)
    pred.record([torch.ones(3, 4), torch.ones(5)], 0)
    bad = torch.ones(5)
    bad[2] = float("nan")
    pred.record([torch.full((3, 4), float("inf")), bad], 1)
    zero = make(kind=kind, residual_decay=0.0)[1]
    zero.record([torch.ones(3, 4), torch.ones(5)], 0)
    zero.record([torch.zeros(3, 4), torch.zeros(5)], 1)
    assert int(pred.skipped) == 1 and pred.last_t == 1
    for a, b in zip(pred.predict(2), zero.predict(2)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    cosine, *_ = pred.correct([torch.ones(3, 4), bad], 3)  # at a CORRECT step too: it measures nothing
    assert int(pred.skipped) == 2 and torch.isnan(cosine)
    assert all(torch.isfinite(p).all() for p in pred.predict(4))


def test_correct_learns_decayed_residual_and_reports_cosine():
    params, pred = make(shapes=((8,),), residual_decay=0.5)
    g = torch.randn(8)
    pred.record([g], 0)
    pred.record([g], 1)
    actual = g + torch.randn(8)
    cos, rel, per_tensor, trust, parts = pred.correct([actual], 2)
    ref_cos = torch.nn.functional.cosine_similarity(g, actual, dim=0)
    assert cos.item() == pytest.approx(ref_cos.item(), abs=1e-5)
    assert per_tensor[0].item() == pytest.approx(ref_cos.item(), abs=1e-5)
    assert rel.item() == pytest.approx(((actual - g).norm() / actual.norm()).item(), rel=1e-5)
    # the parts the whole-step decision sums over admitted tensors: <g, p>, |g|^2, |p|^2
    torch.testing.assert_close(parts[:, 0].float(), torch.stack([actual @ g, actual @ actual, g @ g]), rtol=1e-4, atol=1e-5)
    # trust: the least-squares multiple of the prediction closest to the actual gradient, in [0, 1]
    alpha = min(max((actual @ g / (g @ g)).item(), 0.0), 1.0)
    assert trust[0].item() == pytest.approx(alpha, abs=1e-5)
    # The residual (actual - fit) decays by 0.5 per step since the CORRECT step.
    base = pred.predict_base(4)[0]
    torch.testing.assert_close(pred.predict(4)[0], base + 0.25 * (actual - g), rtol=1e-4, atol=1e-5)


def test_long_runs_stay_exact_across_origin_moves():
    base, vel = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64) * 1e-3
    params, pred = make(shapes=((6,),), decay=0.9, residual_decay=0.0)
    for t in range(0, 3000, 7):  # 0.9**-u passes the rescale limit every ~90 steps
        pred.record([(base + vel * t).float()], t)
    assert pred.origin > 2000
    torch.testing.assert_close(pred.predict(3010)[0].double(), base + vel * 3010, rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_and_mismatch_refused():
    params, a = make()
    for t in range(4):
        a.record([torch.randn(3, 4), torch.randn(5)], t)
    params2, b = make()
    b.load_state_dict(a.state_dict())
    for x, y in zip(a.predict(9), b.predict(9)):
        assert torch.equal(x, y)
    _, c = make(shapes=((3, 5), (5,)))
    with pytest.raises(ValueError, match=r"g0\.0"):
        c.load_state_dict(a.state_dict())


def test_memory_does_not_grow_with_history():
    params, pred = make()
    size = lambda: sum(v.numel() for v in pred.state_dict().values() if isinstance(v, torch.Tensor))
    pred.record([torch.randn(3, 4), torch.randn(5)], 0)
    s1 = size()
    for t in range(1, 50):
        pred.record([torch.randn(3, 4), torch.randn(5)], t)
    assert size() == s1 == 3 * 17 + 1  # G0, G1 and the residual per tensor (and the non-finite count)


@pytest.mark.parametrize("scale,expected", [(0.5, 0.5), (3.0, 1.0), (-2.0, 0.0)])
def test_trust_is_the_clipped_least_squares_scale_of_the_prediction(scale, expected):
    params, pred = make(shapes=((16,), (4, 4)), residual_decay=0.0)
    grads = [torch.randn(16), torch.randn(4, 4)]
    pred.record(grads, 0)
    pred.record(grads, 1)  # the fit predicts exactly these gradients
    _, _, _, trust, _ = pred.correct([g * scale for g in grads], 2)
    torch.testing.assert_close(trust, torch.full((2,), expected, dtype=trust.dtype))


def _flat_pair(compression, shapes=((40, 20), (7,), (3, 100)), block=64, steps=(0, 1, 2, 4, 5, 6, 8), seed=0):
    """The same gradients tracked per tensor and as one flat tensor aligned to blocks (flat.Windows)."""
    from hf_vsa.flat import Windows
    gen = torch.Generator().manual_seed(seed)
    params = [torch.zeros(s) for s in shapes]
    w = Windows(params, 0, 0, 4, scaled=False, fraction=1.0, align=block)
    kw = dict(kind="ar", compression=compression, window=6, block=block, order=2, residual_decay=0.5)
    per = GradientPredictor(params, **kw)
    flat = GradientPredictor([torch.zeros(w.numel)], **kw, groups=([w.block_owner], w.n_groups))
    sizes = [192] * (w.numel // 192) + ([w.numel % 192] if w.numel % 192 else [])  # chunks of 3 blocks
    owners = list(w.block_owner.split([k // block for k in sizes]))
    chunked = GradientPredictor([torch.zeros(k) for k in sizes], **kw, groups=(owners, w.n_groups))
    drift = [torch.randn(s, generator=gen) for s in shapes]
    for k, t in enumerate(steps):
        grads = [d * (1 + 0.3 * k) * (-1) ** (t * j) + 0.2 * torch.randn(s, generator=gen)
                 for j, (d, s) in enumerate(zip(drift, shapes))]
        g = w.gather(grads)
        if k == len(steps) - 1:
            per.correct(grads, t), flat.correct([g], t), chunked.correct(list(g.split(sizes)), t)
        else:
            per.record(grads, t), flat.record([g], t), chunked.record(list(g.split(sizes)), t)
    flat.chunked = chunked
    return params, w, per, flat


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_a_flat_history_with_groups_predicts_what_per_tensor_histories_predict(compression):
    """One AR fit per tensor either way (its blocks' inner products summed per owner), the same records;
    and the same again from the flat tensor handed over in chunks that cut through tensors."""
    params, w, per, flat = _flat_pair(compression)
    expect = per.predict(11)
    got = w.views(flat.predict(11)[0])
    chunked = w.views(torch.cat(flat.chunked.predict(11)))
    for i, e in enumerate(expect):
        torch.testing.assert_close(got[i], e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(chunked[i], e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compression", ["none", "int4", "vsa"])
def test_cutting_tensors_out_of_a_flat_history_keeps_the_others_records(compression):
    from hf_vsa.flat import Windows
    params, w, per, flat = _flat_pair(compression)
    before = w.views(flat.predict(11)[0])
    kept = [0, 2]
    after_w = Windows(params, 0, 0, 4, scaled=False, fraction=1.0, align=64, select=kept)
    keep = torch.tensor(w.blocks_of(kept))
    cut = flat.compact(keep, [torch.zeros(after_w.numel)], ([after_w.block_owner], after_w.n_groups))
    if compression == "vsa":  # keys bind positions of the whole tensor: cannot be cut, the caller starts anew
        assert not cut
        return
    h = flat.history
    assert cut and (h.codes[0].shape[1] == after_w.numel if compression == "none"
                    else h.scales[0].shape[1] == after_w.numel // 64 and h.codes[0].shape[1] == after_w.numel // 2)
    after = after_w.views(flat.predict(11)[0])
    assert sorted(after) == kept
    for i in kept:
        torch.testing.assert_close(after[i], before[i], rtol=1e-5, atol=1e-6)
    state = flat.state_dict()  # the cut state round-trips into a predictor built for the new layout
    again = GradientPredictor([torch.zeros(after_w.numel)], kind="ar", compression=compression, window=6, block=64,
                              order=2, residual_decay=0.5, groups=([after_w.block_owner], after_w.n_groups))
    again.load_state_dict(state)
    torch.testing.assert_close(again.predict(11)[0], flat.predict(11)[0])
