"""Least-squares autoregression of each tensor's gradient sequence, in closed form.

Per tensor, g_s ~ sum_{j=1..k} c_j g_{s-j}: an AR(k) model in the step s, with k scalar
coefficients per tensor. Its normal equations need only the records' inner products (the Gram
matrix of the stored history), so the fit works the same over fp32, ternary or VSA-bundled
records, and costs one k x k solve per tensor, batched over tensors on their device. An AR
model follows an oscillation (g_s = -g_{s-1}: c = (-1, 0)) and a trend (c = (2, -1)), where a
fit in time (WLS, EMA) follows only the trend.

The history is not evenly spaced: PREDICT steps record nothing. The fit therefore uses only the
records whose k predecessors are records too (complete lag windows), and a forecast runs the model
through the steps with no record, each such step standing for its own forecast (the way a Kalman
filter fills missing observations). A forecast is thus a weighted sum of the stored records, with
per-tensor weights: these functions return those weights, and the history reads the sum back.
Pure tensor functions; host ints only for the record times.
"""
import torch


def ar_fit(gram, times, order, ridge=1e-3):
    """gram: [T, n, n] inner products of each of T tensors' n records, ordered as `times` (the
    records' steps, increasing host ints). Returns the coefficients [T, order] (gram's dtype and
    device) of the least-squares fit over the complete lag windows, ridge-regularised by
    ridge * trace(A) / order (scale-free). A tensor with no complete window, or a singular system
    (a gradient that is all zeros), gets c = (1, 0, ...): its last value persists."""
    T = gram.shape[0]
    persist = torch.zeros(T, order, dtype=gram.dtype, device=gram.device)
    persist[:, 0] = 1.0
    pos = {t: k for k, t in enumerate(times)}
    rows = [(pos[s], [pos[s - j] for j in range(1, order + 1)]) for s in times
            if all(s - j in pos for j in range(1, order + 1))]
    if not rows:
        return persist
    target = torch.tensor([r for r, _ in rows], device=gram.device)
    lags = torch.tensor([lag for _, lag in rows], device=gram.device)  # [m, order]
    a = gram[:, lags[:, :, None], lags[:, None, :]].sum(1)  # [T, order, order]
    b = gram[:, lags, target[:, None]].sum(1)  # [T, order]: <g_{s-j}, g_s> summed over windows
    eye = torch.eye(order, dtype=gram.dtype, device=gram.device)
    a = a + (ridge * a.diagonal(dim1=1, dim2=2).sum(-1) / order)[:, None, None] * eye
    c, info = torch.linalg.solve_ex(a, b)  # (solve_ex: no host sync for the error check)
    ok = (info == 0) & c.isfinite().all(-1) & (a.diagonal(dim1=1, dim2=2).sum(-1) > 0)
    return torch.where(ok[:, None], c, persist)


def ar_weights(coeffs, times, t):
    """Weights [T, n] over the n records (ordered as `times`) whose weighted sum is the AR forecast
    of step t >= times[-1]. Every step from the oldest record to t is a record (itself) or, with no
    record, the forecast from the `order` steps before it; steps before the oldest record count
    as zero."""
    T, order = coeffs.shape
    n = len(times)
    pos = {s: k for k, s in enumerate(times)}
    eye = torch.eye(n, dtype=coeffs.dtype, device=coeffs.device)
    zero = torch.zeros(T, n, dtype=coeffs.dtype, device=coeffs.device)
    seq = {}
    for s in range(times[0], t + 1):
        if s in pos:
            seq[s] = eye[pos[s]].expand(T, n)
        else:
            w = zero
            for j in range(order):
                w = w + coeffs[:, j, None] * seq.get(s - 1 - j, zero)
            seq[s] = w
        seq.pop(s - order - 1, None)  # only the last `order` steps are read again
    return seq[t]
