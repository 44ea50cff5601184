"""Closed-form gradient prediction over lists of tensors.

The WLS predictor fits g(u) = baseline + velocity * u per element over all recorded gradients,
weighted by decay**age, with u the time relative to the newest record. It never stores the
history: the normal equations only need the running sums

    sw = sum w,  su = sum w u,  suu = sum w u^2      (0-dim tensors)
    G0 = sum w g,  G1 = sum w u g                    (one buffer each per parameter)

and Cramer's rule gives the prediction at u = tau as a0 * G0 + a1 * G1. Memory: 2x the tracked
parameters (fp32) plus 1x for the residual, whatever the history length.

All state lives on the parameters' device; nothing here reads a value back to the host.
"""
import torch

KINDS = ("wls", "momentum")


def wls_coefficients(sw, su, suu, tau):
    """(a0, a1) with prediction = a0*G0 + a1*G1 at time tau after the newest record.

    Falls back to the weighted mean (a1 = 0) when the fit is degenerate (records at a single
    time) and to zero when nothing was recorded."""
    det = sw * suu - su * su
    fit = det > 1e-9 * sw * sw
    safe_det = torch.where(fit, det, torch.ones_like(det))
    safe_sw = torch.where(sw > 0, sw, torch.ones_like(sw))
    a0 = torch.where(fit, (suu - su * tau) / safe_det, torch.where(sw > 0, 1.0 / safe_sw, torch.zeros_like(sw)))
    a1 = torch.where(fit, (sw * tau - su) / safe_det, torch.zeros_like(sw))
    return a0, a1


def all_finite(tensors):
    """0-dim bool tensor on the tensors' device: every element of every tensor is finite."""
    return torch.stack([n.float() for n in torch._foreach_norm(tensors)]).sum().isfinite()


def add_where(acc, values, ok, alpha=1.0):
    """acc += alpha * values, only where `ok` (0-dim bool) holds; non-finite values never leak in."""
    zero = torch.zeros((), device=ok.device)
    for a, v in zip(acc, values):
        a.add_(torch.where(ok, v, zero), alpha=alpha)


class GradientPredictor:
    """Stateful wrapper: record(grads, t), predict(t), correct(grads, t); state_dict() round-trips."""

    def __init__(self, params, kind="wls", decay=0.95, residual_decay=0.5, momentum=0.9):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.params = list(params)
        if not self.params:
            raise ValueError("GradientPredictor needs at least one parameter with requires_grad=True")
        self.kind, self.decay, self.residual_decay, self.momentum = kind, decay, residual_decay, momentum
        dev = self.params[0].device

        def buffers():
            return [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in self.params]

        self.g0 = buffers()
        self.g1 = buffers() if kind == "wls" else []
        self.residual = buffers() if residual_decay > 0 else []
        scalar = dict(device=dev, dtype=torch.float64)
        self.sw, self.su, self.suu = (torch.zeros((), **scalar) for _ in range(3))
        self.skipped = torch.zeros((), device=dev, dtype=torch.int64)
        self.last_t = -1  # time of the newest record (host int, from the schedule)
        self.residual_t = -1  # time the residual was learned; -1: none yet

    # ---- recording -------------------------------------------------------------------------
    def record(self, grads, t: int):
        """Add the gradient observed at optimizer step t. Non-finite gradients are not added
        (on device, no host sync); `skipped` counts them."""
        ok = all_finite(grads)
        self.skipped += (~ok).long()
        okf = ok.double()
        if self.kind == "wls":
            dt = 0 if self.last_t < 0 else t - self.last_t
            if dt:
                # Re-reference times to t (u -> u - dt), then age every record by dt steps.
                torch._foreach_add_(self.g1, self.g0, alpha=-dt)
                self.suu = self.suu - 2 * dt * self.su + dt * dt * self.sw
                self.su = self.su - dt * self.sw
                d = self.decay ** dt
                torch._foreach_mul_(self.g0, d)
                torch._foreach_mul_(self.g1, d)
                self.sw, self.su, self.suu = self.sw * d, self.su * d, self.suu * d
            add_where(self.g0, grads, ok)
            self.sw = self.sw + okf
        else:  # bias-corrected EMA; a skipped record leaves it untouched
            beta = torch.where(ok, torch.tensor(self.momentum, dtype=torch.float64, device=ok.device), 1.0)
            torch._foreach_mul_(self.g0, beta.float())
            add_where(self.g0, grads, ok, alpha=1.0 - self.momentum)
            self.sw = self.sw * beta + (1.0 - self.momentum) * okf
        self.last_t = t

    # ---- prediction ------------------------------------------------------------------------
    def predict_base(self, t: int):
        """Fit prediction at step t, without the residual; fresh tensors in fp32 (or wider)."""
        if self.kind == "wls":
            a0, a1 = wls_coefficients(self.sw, self.su, self.suu, float(t - self.last_t))
            out = torch._foreach_mul(self.g0, a0.float())
            torch._foreach_add_(out, torch._foreach_mul(self.g1, a1.float()))
            return out
        inv = torch.where(self.sw > 0, 1.0 / torch.where(self.sw > 0, self.sw, 1.0), 0.0)
        return torch._foreach_mul(self.g0, inv.float())

    def _add_residual(self, out, t):
        if self.residual and self.residual_t >= 0:
            torch._foreach_add_(out, self.residual, alpha=self.residual_decay ** (t - self.residual_t))
        return out

    def predict(self, t: int):
        return self._add_residual(self.predict_base(t), t)

    def correct(self, grads, t: int):
        """At a CORRECT step: compare the prediction for t with the actual gradient, learn the
        residual, then record. Returns device tensors (cosine, relative residual, per-tensor
        cosine)."""
        ok = all_finite(grads)
        base = self.predict_base(t)
        pred = self._add_residual([b.clone() for b in base], t) if self.residual else base
        a2 = torch.stack(torch._foreach_norm(grads)).double() ** 2
        p2 = torch.stack(torch._foreach_norm(pred)).double() ** 2
        actual = [g.to(b.dtype) for g, b in zip(grads, base)]
        diff = torch._foreach_sub(actual, pred)
        d2 = torch.stack(torch._foreach_norm(diff)).double() ** 2
        dots = (a2 + p2 - d2) / 2  # a.p from the three norms: no extra full-size buffer
        per_tensor = dots / (a2.sqrt() * p2.sqrt()).clamp_min(1e-30)
        cosine = dots.sum() / (a2.sum().sqrt() * p2.sum().sqrt()).clamp_min(1e-30)
        rel_residual = d2.sum().sqrt() / a2.sum().sqrt().clamp_min(1e-30)
        if self.residual:
            fresh = torch._foreach_sub(actual, base)  # residual = actual - fit
            for r, f in zip(self.residual, fresh):
                r.copy_(torch.where(ok, f, r))
            self.residual_t = t
        self.record(grads, t)
        nan = torch.full((), float("nan"), dtype=torch.float64, device=ok.device)
        return torch.where(ok, cosine, nan), torch.where(ok, rel_residual, nan), per_tensor

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = {"sw": self.sw, "su": self.su, "suu": self.suu, "skipped": self.skipped,
             "last_t": self.last_t, "residual_t": self.residual_t}
        for name in ("g0", "g1", "residual"):
            for i, x in enumerate(getattr(self, name)):
                s[f"{name}.{i}"] = x
        return s

    def load_state_dict(self, state: dict):
        expected = set(self.state_dict())
        if set(state) != expected:
            raise KeyError(f"predictor state keys differ: missing {sorted(expected - set(state))[:5]}, "
                           f"unexpected {sorted(set(state) - expected)[:5]}")
        for name in ("g0", "g1", "residual"):
            for i, x in enumerate(getattr(self, name)):
                v = state[f"{name}.{i}"]
                if v.shape != x.shape or v.dtype != x.dtype:
                    raise ValueError(f"predictor state {name}.{i}: expected {tuple(x.shape)} {x.dtype}, "
                                     f"got {tuple(v.shape)} {v.dtype}")
                x.copy_(v)
        for name in ("sw", "su", "suu", "skipped"):
            setattr(self, name, state[name].to(getattr(self, name).device, getattr(self, name).dtype).clone())
        self.last_t, self.residual_t = int(state["last_t"]), int(state["residual_t"])
