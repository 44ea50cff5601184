"""Closed-form fits in time over recorded gradients (WLS: baseline + velocity; EMA), as host
coefficients: the predictor applies them to its running sums or, over a compressed ring of records,
reads the prediction back as one weighted sum of the records (the AR fit: autoregress.py)."""


def wls_coefficients(sw: float, st: float, stt: float, u: float):
    """(a0, a1) with prediction = a0*G0 + a1*G1 at time u. Degenerate fits (records at a single
    time) fall back to the weighted mean; no records at all predict zero."""
    if sw <= 0:
        return 0.0, 0.0
    det = sw * stt - st * st
    if det <= 1e-9 * sw * stt or det <= 0:
        return 1.0 / sw, 0.0
    return (stt - st * u) / det, (sw * u - st) / det


def ring_weights(filled, t: int, kind: str, decay: float, momentum: float) -> dict:
    """{slot: weight} so that the prediction at step t is sum_k weight_k * record_k over the ring's
    records `filled` ((slot, step) pairs): the same fit as the running sums, over the records still in
    the ring; for kind 'momentum' a normalised EMA (bias corrected)."""
    filled = sorted(filled, key=lambda kt: kt[1])
    if not filled:
        return {}
    if kind == "momentum":
        n = len(filled)
        w = {k: (1 - momentum) * momentum ** (n - 1 - j) for j, (k, _) in enumerate(filled)}
        total = sum(w.values())
        return {k: v / total for k, v in w.items()}
    newest = filled[-1][1]
    c = {k: decay ** (newest - tk) for k, tk in filled}
    u = {k: float(tk - newest) for k, tk in filled}
    sw, st = sum(c.values()), sum(c[k] * u[k] for k in c)
    stt = sum(c[k] * u[k] ** 2 for k in c)
    a0, a1 = wls_coefficients(sw, st, stt, float(t - newest))
    return {k: c[k] * (a0 + a1 * u[k]) for k in c}
