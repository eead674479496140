"""Fits trained to their optimum: early stopping on validation loss (patience, relative min_delta, step cap,
best checkpoint), the fit's status, and the retry of fits that never leave the identity."""

from __future__ import annotations

from dataclasses import replace

import pytest

from locaudit.errors import LocauditError
from locaudit.heads import parse_heads
from locaudit.interventions import LocalizedRank1
from locaudit.training import FitConfig, fit, fit_summary, fit_to_optimum
from tests.test_edits import toy_pairs


def _edit(lm):
    return LocalizedRank1(parse_heads("L1H0,L2H1", 3, 4), lm.arch)


def _val(r):
    return [h for h in r.history if "val_loss" in h]


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best_checkpoint(tiny_llama):
    lm = tiny_llama
    cfg = FitConfig(tau=0.5, batch_size=4, lr=1e-1, fmt="plain", max_steps=400, eval_every=2, patience=3, min_delta=0.01)
    r = fit(lm, _edit(lm), toy_pairs(16), toy_pairs(8, 100), cfg, progress=False)
    v = _val(r)
    assert r.status == "converged" and r.steps < 400 and r.moved
    assert [h["step"] for h in v] == list(range(0, r.steps + 1, 2))  # validated every 2 steps, stopped on one
    # the stopping rule, replayed by hand: the last 3 validations did not beat the running best by 1%
    best = [min(h["val_loss"] for h in v[: i + 1]) for i in range(len(v))]
    assert all(v[i]["val_loss"] >= best[i - 1] * 0.99 for i in range(len(v) - 3, len(v)))
    assert v[-4]["val_loss"] < best[-5] * 0.99 or len(v) == 4  # ... and the one before them did
    assert r.best["val_loss"] == min(h["val_loss"] for h in v)
    s = fit_summary(r)
    assert s["status"] == "converged" and s["steps"] == r.steps and len(s["train_curve"]) == r.steps


def test_step_cap_is_not_called_converged(tiny_llama):
    cfg = FitConfig(tau=0.5, batch_size=4, lr=1e-2, fmt="plain", max_steps=6, eval_every=2, patience=50)
    r = fit(tiny_llama, _edit(tiny_llama), toy_pairs(16), toy_pairs(8, 100), cfg, progress=False)
    assert r.status == "step_cap" and r.steps == 6 and [h["step"] for h in _val(r)] == [0, 2, 4, 6]


def test_fixed_schedule_runs_every_epoch(tiny_llama):
    cfg = FitConfig(tau=0.5, epochs=3, batch_size=4, lr=1e-1, fmt="plain")
    r = fit(tiny_llama, _edit(tiny_llama), toy_pairs(16), toy_pairs(8, 100), cfg, progress=False)
    assert r.status == "fixed_schedule" and r.steps == 12 and [h["step"] for h in _val(r)] == [0, 4, 8, 12]


def test_stuck_fit_is_retried_at_a_lower_learning_rate(tiny_llama):
    lm = tiny_llama
    # lr 1e4 throws the edit far from the optimum at the first step: the start stays the best checkpoint
    cfg = FitConfig(tau=0.5, batch_size=4, lr=1e4, fmt="plain", max_steps=8, eval_every=2, patience=2,
                    retries=1, retry_factor=1e-5)
    r = fit(lm, _edit(lm), toy_pairs(16), toy_pairs(8, 100), cfg, progress=False)
    assert r.status == "stuck" and not r.moved and r.best["step"] == 0
    r = fit_to_optimum(lm, lambda: _edit(lm), toy_pairs(16), toy_pairs(8, 100), cfg, progress=False)
    assert [a["lr"] for a in r.attempts] == [1e4] and r.attempts[0]["status"] == "stuck"
    assert r.config.lr == pytest.approx(1e-1) and r.moved and r.status != "stuck"
    never = fit_to_optimum(lm, lambda: _edit(lm), toy_pairs(16), toy_pairs(8, 100),
                           FitConfig(tau=0.5, batch_size=4, lr=1e4, fmt="plain", max_steps=4, eval_every=2,
                                     patience=2, retries=2, retry_factor=0.5), progress=False)
    assert never.status == "stuck" and [a["lr"] for a in never.attempts] == [1e4, 5e3]
    assert never.config.lr == 2.5e3


def test_flat_fits_are_retried_only_with_retry_flat(tiny_llama):
    """A fit whose best validation loss is less than min_delta below its start is flat; `retry_flat` retries it
    at a lower learning rate like a stuck one (packed and one by one alike), without it the fit is kept."""
    from locaudit.packed import fit_packed_to_optimum

    lm = tiny_llama
    train, val = toy_pairs(16), toy_pairs(8, 100)
    cfg = FitConfig(tau=0.5, batch_size=4, lr=1e-5, fmt="plain", max_steps=4, eval_every=2, patience=2,
                    retries=1, retry_factor=0.5, min_delta=0.01)
    r = fit(lm, _edit(lm), train, val, cfg, progress=False)
    start, best = r.history[0]["val_loss"], r.best["val_loss"]
    assert r.moved and best < start and r.flat and best > start * 0.99 and not r.retry  # moved, but by < 1%
    kept = fit_to_optimum(lm, lambda: _edit(lm), train, val, cfg, progress=False)
    assert kept.attempts == [] and kept.config.lr == 1e-5
    flat = replace(cfg, retry_flat=True)
    assert replace(r, config=flat).retry
    again = fit_to_optimum(lm, lambda: _edit(lm), train, val, flat, progress=False)
    # the retry at 5e-6 moved less than the first attempt: the better first attempt is kept, the retry listed
    (retry,) = again.attempts
    assert retry["lr"] == 5e-6 and retry["status"] == "flat" and retry["val_loss_min"] > best
    assert again.config.lr == 1e-5 and again.best["val_loss"] == pytest.approx(best)
    assert again.seconds > retry["seconds"] > 0
    packed = fit_packed_to_optimum(lm, [lambda: _edit(lm)] * 2, train, val, [flat, cfg], progress=False)
    assert [a["lr"] for a in packed[0].attempts] == [5e-6] and packed[0].config.lr == 1e-5
    assert packed[1].attempts == [] and packed[1].config.lr == 1e-5  # without retry_flat: not retried, packed too
    # a fit that left its plateau is not flat and is never retried
    good = fit(lm, _edit(lm), train, val, replace(flat, lr=1e-1, max_steps=8), progress=False)
    assert good.best["val_loss"] < 0.99 * good.history[0]["val_loss"] and not good.flat and not good.retry


def test_bad_convergence_settings():
    for kw in ({"patience": 3}, {"patience": 3, "max_steps": 10}, {"max_steps": 0}, {"min_delta": 1.0},
               {"retry_factor": 1.5}, {"retries": -1}):
        with pytest.raises(LocauditError):
            FitConfig(**kw)


@pytest.mark.parametrize("kind", ["localized", "full"])
def test_lora_scale_multiplies_the_edit_like_peft(tiny_llama, kind, tmp_path):
    """scale s with b (B) equals scale 1 with s * b: PEFT's lora_alpha / r; merge and save/load keep it."""
    import torch

    from locaudit.methods import make_edit
    from locaudit.interventions import load_intervention
    from tests.test_edits import logits, randomise

    lm = tiny_llama
    heads = None if kind == "full" else parse_heads("L0H1,L2H3", 3, 4)
    scaled = randomise(make_edit(lm, heads, seed=0, scale=8.0))
    plain = make_edit(lm, heads, seed=0, scale=1.0)
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.startswith(("b_s", "B")):
                p.mul_(8.0)
    with scaled.attach(lm):
        hooked = logits(lm)
    with plain.attach(lm):
        assert torch.allclose(logits(lm), hooked, atol=1e-4)
    scaled.save(tmp_path)
    loaded = load_intervention(tmp_path, lm.arch)
    assert loaded.scale == 8.0
    with loaded.attach(lm):
        assert torch.allclose(logits(lm), hooked, atol=1e-5)
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    scaled.merge(lm)
    assert torch.allclose(logits(lm), hooked, atol=1e-4)
    lm.model.load_state_dict(base)


def test_paper_preset_states_its_lora_scale_and_trains_to_the_optimum():
    from locaudit.study import load_preset

    fit_cfg = load_preset("paper").fit
    assert fit_cfg.lora_scale == 8.0 and (fit_cfg.lr_one, fit_cfg.lr_k16, fit_cfg.lr_all) == (2e-3, 5e-4, 1e-4)
    assert fit_cfg.early_stopping and fit_cfg.epochs == 2


def test_plateau_rule_by_hand():
    from locaudit.training import Plateau

    # 0.7% per validation: under min_delta each time, but 1.4% over the reference every second one, so a slow
    # steady decline never counts as a plateau (a reference that followed every small gain would stop at the 3rd)
    slow = Plateau(min_delta=0.01, patience=3, reference=100.0)
    assert [slow.update(100.0 * 0.993 ** (i + 1)) for i in range(6)] == [False] * 6
    assert (slow.stale, round(slow.reference, 3)) == (0, round(100 * 0.993 ** 6, 3))
    flat = Plateau(min_delta=0.01, patience=2, reference=10.0)
    assert [flat.update(x) for x in (9.0, 8.95, 9.5, 8.0, 8.0, 7.95)] == [False, False, True, False, False, True]


def test_step_cap_without_eval_every_still_validates(tiny_llama):
    cfg = FitConfig(tau=0.5, batch_size=4, lr=1e-1, fmt="plain", max_steps=3)
    r = fit(tiny_llama, _edit(tiny_llama), toy_pairs(16), toy_pairs(8, 100), cfg, progress=False)
    assert r.steps == 3 and [h["step"] for h in _val(r)] == [0, 3] and r.status == "fixed_schedule"
