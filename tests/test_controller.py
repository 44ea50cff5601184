import pytest

from hf_vsa import Phase, PhaseController


def seq(ctrl, n, **kw):
    return "".join(ctrl.next_phase(**kw).name[0] for _ in range(n))


def test_fixed_schedule_sequence():
    c = PhaseController(warmup_steps=2, full_steps=2, predict_steps=5, correct_every=2, min_history=2, adaptive=False)
    assert seq(c, 16) == "WW" + "FF" + "PCPCP" + "FF" + "PCPCP"[:5]


def test_warmup_lasts_until_history_is_long_enough():
    c = PhaseController(warmup_steps=1, full_steps=1, predict_steps=2, correct_every=5, min_history=4, adaptive=False)
    assert seq(c, 8) == "WWWW" + "FPP" + "F"


def test_no_correct_on_last_predict_step():
    c = PhaseController(warmup_steps=0, full_steps=1, predict_steps=3, correct_every=3, min_history=0, adaptive=False)
    assert seq(c, 8) == "FPPP" + "FPPP"


def test_predict_steps_zero_is_all_backprop():
    c = PhaseController(warmup_steps=1, full_steps=3, predict_steps=0, correct_every=1, min_history=1, adaptive=False)
    assert seq(c, 7) == "W" + "FFFFFF"


def test_full_steps_zero_cycles_through_predict():
    c = PhaseController(warmup_steps=2, full_steps=0, predict_steps=4, correct_every=2, min_history=2, adaptive=False)
    assert seq(c, 10) == "WW" + "PCPP" + "PCPP"


def test_rising_loss_lengthens_full_and_shortens_predict():
    c = PhaseController(warmup_steps=0, full_steps=2, predict_steps=8, correct_every=4, min_history=0,
                        adaptive=True, loss_threshold=0.1)
    losses = iter([1.0, 1.5])
    seq(c, 10, cycle_loss=lambda: next(losses))
    seq(c, 10, cycle_loss=lambda: next(losses))  # second cycle ends here? not yet: first end
    c.next_phase(cycle_loss=lambda: next(losses))  # ends cycle 2: loss rose 50%
    assert (c.full, c.predict) == (4, 4)
    assert c.block is Phase.FULL


def test_falling_loss_recovers_the_configured_schedule_and_never_skips_more():
    c = PhaseController(warmup_steps=0, full_steps=3, predict_steps=6, correct_every=3, min_history=0,
                        adaptive=True, loss_threshold=0.1)
    for loss in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5):  # falling from the start: already at the configured lengths
        c._adapt(loss)
    assert (c.full, c.predict) == (3, 6)
    c._adapt(0.6)  # a 20% rise: back off
    assert (c.full, c.predict) == (6, 3)
    c._adapt(0.5)
    assert (c.full, c.predict) == (6, 3)  # one fall is not yet steady
    c._adapt(0.4)
    assert (c.full, c.predict) == (5, 6)  # two in a row: one step back, bounded by the configured PREDICT
    for loss in (0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002):
        c._adapt(loss)
    assert (c.full, c.predict) == (3, 6)  # bounded by [full_steps, 4*full_steps] and [1, predict_steps]


def test_adaptive_off_ignores_losses():
    c = PhaseController(warmup_steps=0, full_steps=2, predict_steps=4, correct_every=2, min_history=0, adaptive=False)
    seq(c, 30, cycle_loss=lambda: pytest.fail("loss must not be read when adaptive is off"))
    assert (c.full, c.predict) == (2, 4)


def test_large_residual_brings_the_next_correct_forward():
    c = PhaseController(warmup_steps=0, full_steps=1, predict_steps=40, correct_every=6, min_history=0,
                        adaptive=False, residual_threshold=1.5)
    assert seq(c, 7) == "F" + "PPPPPC"
    c.report_residual(0.5)
    assert seq(c, 6) == "PPPPPC"
    c.report_residual(2.0)  # 4x the running mean: early correction after half the interval
    assert seq(c, 3) == "PPC"
    c.report_residual(0.5)
    assert seq(c, 6) == "PPPPPC"


def test_counts_and_state_dict_round_trip():
    a = PhaseController(warmup_steps=3, full_steps=2, predict_steps=6, correct_every=2, min_history=2)
    seq(a, 13, cycle_loss=lambda: 1.0)
    b = PhaseController(warmup_steps=3, full_steps=2, predict_steps=6, correct_every=2, min_history=2)
    b.load_state_dict(a.state_dict())
    assert seq(a, 40, cycle_loss=lambda: 2.0) == seq(b, 40, cycle_loss=lambda: 2.0)
    assert a.counts == b.counts and sum(a.counts.values()) == 53
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({"step": 1})


def test_records_before_read_counts_the_backprop_steps_left_before_a_predict_block():
    c = PhaseController(warmup_steps=3, full_steps=2, predict_steps=4, correct_every=2, min_history=3, adaptive=False)
    got = []
    for _ in range(11):
        p = c.next_phase()
        got.append((p.name[0], c.records_before_read()))
    assert got == [("W", 4), ("W", 3), ("W", 2), ("F", 1), ("F", 0), ("P", 0), ("C", 0), ("P", 0), ("P", 0),
                   ("F", 1), ("F", 0)]
    never = PhaseController(warmup_steps=1, full_steps=2, predict_steps=0, min_history=1, adaptive=False)
    never.next_phase()
    assert never.records_before_read() == float("inf")  # nothing ever reads the predictor


def test_admitted_worth_counts_only_the_tracked_tensors_the_gate_admits():
    from hf_vsa.policy import admitted
    nan = float("nan")
    # tensor 0 admitted (cosine 0.6 with 4/10 of the energy), 1 kept out, 2 admitted but not tracked (NaN)
    dots, a2, p2 = [1.2, 0.5, nan], [4.0, 6.0, nan], [1.0, 1.0, nan]
    cosine, energy, worth = admitted([True, False, True], dots, a2, p2)
    assert cosine == pytest.approx(0.6) and energy == pytest.approx(0.4) and worth == pytest.approx(0.24)
    both = admitted([True, True, False], dots, a2, p2)
    assert both[0] == pytest.approx(1.7 / (10.0 * 2.0) ** 0.5) and both[1] == pytest.approx(1.0)
    cosine, energy, worth = admitted([False, False, False], dots, a2, p2)
    assert cosine != cosine and energy == 0.0 and worth == 0.0  # nothing admitted: worth 0, not NaN


def test_whole_step_pays_only_where_measured_worth_enough_of_a_backward():
    from hf_vsa.policy import lower_bound, whole_step_pays
    nan, p, tol = float("nan"), 0.68, 0.05  # the default schedule predicts 17 of 25 steps
    need = 1 - tol / ((1 + tol) * p)  # the worth of a predicted step that costs tol more steps
    steady = [0.9 * 0.45] * 3  # sentiment at batch 256: AR above the mean's share, at 3 CORRECT steps alike
    assert whole_step_pays(steady, 0.32, p, tol)
    assert not whole_step_pays([0.9 * 0.2] * 3, 0.99, p, tol)  # nearly deterministic gradients: a backward is better
    kappa = 0.9
    assert whole_step_pays([need * kappa + 1e-9] * 2, kappa, p, tol)  # just enough...
    assert not whole_step_pays([need * kappa - 1e-9] * 2, kappa, p, tol)  # ...and not quite
    assert not whole_step_pays([0.4 * 0.5] * 3, 0.32, p, tol)  # the gate admits too little of the gradient's energy
    assert not whole_step_pays(steady, 0.0, p, tol)  # no mean measured at all
    assert not whole_step_pays(steady, 0.3, 0.0, tol)  # nothing is predicted
    assert not whole_step_pays(steady, nan, p, tol)
    assert not whole_step_pays([0.45], 0.32, p, tol)  # one measurement: no spread known, no decision
    # Small batch: single CORRECT steps scatter around zero; one lucky one must not open whole steps,
    # though the mean of the good ones alone would pass.
    scattered = [0.30, -0.20, 0.25, -0.15]
    assert lower_bound(scattered) < 0 and not whole_step_pays(scattered, 0.1, p, tol)
    assert whole_step_pays([0.30, 0.25, 0.28], 0.1, p, tol)  # consistently good measurements do
    assert lower_bound([1.0, 2.0, 3.0]) == pytest.approx(2.0 - 2.0 * (1.0 / 3) ** 0.5)
    assert whole_step_pays([nan, *steady], 0.32, p, tol)  # unmeasured entries are left out
    # the steps the predicted share costs stay within the tolerance at the boundary
    v = need
    assert 1 / (1 - p * (1 - v)) <= 1 + tol + 1e-12


def test_predict_share_counts_predicted_steps_without_corrections():
    c = PhaseController(warmup_steps=10, full_steps=5, predict_steps=20, correct_every=5)
    assert c.predict_share == (20 - 3) / 25  # CORRECT at 5, 10, 15 (none on the last PREDICT step)
    assert PhaseController(full_steps=5, predict_steps=0).predict_share == 0.0
