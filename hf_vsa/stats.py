"""The run's statistics, as plain numbers for logs and the model card."""


def engine_stats(engine, timing=True) -> dict:
    """Plain numbers for logs and the model card (host syncs: call at logging steps only)."""
    c = engine.controller.counts
    steps = engine.controller.step
    backward = steps - c["PREDICT"]
    out = {"vsa/phase": float(engine.phase) if engine.phase is not None else -1.0,
           "vsa/backward_fraction": backward / steps if steps else 1.0}
    out.update({f"vsa/steps_{k.lower()}": v for k, v in c.items()})
    out["vsa/backward_passes_skipped"] = c["PREDICT"]
    t = engine.tracker
    out["vsa/prediction_cosine"] = t.cosine.item()  # host sync: logging steps only
    out["vsa/prediction_cosine_mean"] = (
        (t.cosine_sum / t.corrections).item() if t.corrections else float("nan"))  # host sync: logging
    bw_time = sum(engine.seconds[k] for k in ("WARMUP", "FULL", "CORRECT"))
    total = sum(engine.seconds.values())
    if timing:  # measured wall time: for the model card and summaries, never per-step logs
        out["vsa/speedup_estimate"] = (steps * bw_time / backward / total) if backward and total else 1.0
    out["vsa/nonfinite_records_skipped"] = int(t.skipped)  # host sync: logging steps only
    out["vsa/predicted_tensor_fraction"] = 0.0 if t.probing else sum(t.predict_mask) / len(t.predict_mask)
    out["vsa/probing"] = float(t.probing)
    out["vsa/tracked_tensor_fraction"] = len(t.tracked) / len(engine.params)
    if engine.blocks:
        out["vsa/block_drop_mean"] = sum(engine.drop) / len(engine.drop)
        out["vsa/block_consistency_mean"] = engine.consistency.mean[:-1].mean().item()  # host sync: logging steps only
        out["vsa/backed_off"] = float(engine.backed_off)
    kappa, b_noise, ratio = engine.noise_estimate  # (no collective here: rank 0 alone calls this for the card)
    out["vsa/noise_scale"], out["vsa/batch_over_noise_scale"], out["vsa/mean_share"] = b_noise, ratio, kappa
    out["vsa/whole_step"] = float(engine.whole)
    if engine.accum > 1:
        out["vsa/micro_batches"] = engine.micro.target
        out["vsa/micro_batch_fraction"] = engine.micro.computed / engine.micro.seen if engine.micro.seen else 1.0
    out["vsa/admitted_cosine"], out["vsa/admitted_energy"] = t.admitted_cosine, t.admitted_energy
    out["vsa/state_memory_ratio"] = t.state_memory_ratio()
    t.peak_state_ratio = max(t.peak_state_ratio, out["vsa/state_memory_ratio"])
    out["vsa/state_memory_peak_ratio"] = t.peak_state_ratio
    return out
