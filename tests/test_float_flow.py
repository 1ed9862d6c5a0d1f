"""Rectified-flow core: training objective, condition dropout, guidance and ODE sampling."""
from __future__ import annotations

import math

import pytest
import torch

from omniflow.flow import (ConditionDropout, FlowSampler, GuidanceScales, RectifiedFlow, SamplerConfigError,
                           guided_velocity, sample_in_windows)
from omniflow.runtime.noise import sample_generators


def test_interpolation_and_target():
    x0, x1 = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = RectifiedFlow.interpolate(x0, x1, t)
    assert torch.equal(xt[0], x0[0])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * x1[1])
    assert torch.equal(xt[2], x1[2])
    assert torch.equal(RectifiedFlow.target(x0, x1), x1 - x0)
    # moving along the target velocity from any x_t reaches the data at t = 1
    assert torch.allclose(xt + (1 - t)[:, None, None] * RectifiedFlow.target(x0, x1), x1, atol=1e-6)


def test_draw_is_consistent_and_seeded():
    flow = RectifiedFlow()
    x1 = torch.randn(4, 6, 3)
    draw = flow.draw(x1, generator=torch.Generator().manual_seed(3))
    assert draw.t.shape == (4,) and draw.x0.shape == x1.shape
    assert torch.allclose(draw.xt, RectifiedFlow.interpolate(draw.x0, x1, draw.t))
    assert torch.equal(draw.target, x1 - draw.x0)
    again = flow.draw(x1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.x0, draw.x0) and torch.equal(again.t, draw.t)


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_a_generator_per_sample_makes_draws_independent_of_the_batch(time_sampling):
    """Validation's noise: sample i draws from its own generator, so batches of 4 or 2 + 2 (two ranks) agree."""
    flow = RectifiedFlow(time_sampling=time_sampling)
    x1 = torch.randn(4, 6, 3)
    whole = flow.draw(x1, generator=sample_generators(0, range(4)))
    halves = [flow.draw(x1[rows], generator=sample_generators(0, rows)) for rows in ([0, 2], [1, 3])]
    assert torch.equal(torch.stack([halves[i % 2].x0[i // 2] for i in range(4)]), whole.x0)
    assert torch.equal(torch.stack([halves[i % 2].t[i // 2] for i in range(4)]), whole.t)
    assert not torch.equal(whole.x0[0], whole.x0[1])
    with pytest.raises(ValueError, match="3 generators for 4 rows"):
        flow.draw(x1, generator=sample_generators(0, range(3)))


def test_time_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = RectifiedFlow().sample_time(20000, generator=g)
    logit = RectifiedFlow(time_sampling="logit_normal").sample_time(20000, generator=g)
    shifted = RectifiedFlow(time_sampling="logit_normal", logit_mean=1.0, logit_std=0.5).sample_time(20000,
                                                                                                   generator=g)
    for t in (uniform, logit, shifted):
        assert 0.0 <= t.min() and t.max() <= 1.0
    assert abs(uniform.mean().item() - 0.5) < 0.01
    middle = lambda t: ((t > 1 / 3) & (t < 2 / 3)).float().mean().item()
    assert abs(middle(uniform) - 1 / 3) < 0.02
    assert middle(logit) > 0.45  # logit-normal concentrates on the middle of the path
    assert abs(logit.median().item() - 0.5) < 0.01
    assert abs(shifted.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01
    z = torch.logit(shifted.clamp(1e-6, 1 - 1e-6))
    assert abs(z.mean().item() - 1.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02


def test_velocity_loss_on_frame_differences():
    target = torch.randn(2, 7, 3)
    flow = RectifiedFlow(velocity_weight=0.5)
    exact = flow.loss(target.clone(), target)
    assert exact.total == 0 and exact.velocity == 0
    shifted = flow.loss(target + 1.0, target)  # a constant offset has the target's frame differences
    assert torch.isclose(shifted.flow, torch.tensor(1.0)) and shifted.velocity < 1e-12
    jitter = torch.zeros_like(target)
    jitter[:, 3] = 1.0
    jittered = flow.loss(target + jitter, target)
    expected_velocity = ((jitter[:, 1:] - jitter[:, :-1]) ** 2).mean()
    assert torch.isclose(jittered.velocity, expected_velocity)
    assert torch.isclose(jittered.total, jittered.flow + 0.5 * expected_velocity)
    l1 = RectifiedFlow(loss_type="l1").loss(target + jitter, target)
    assert torch.isclose(l1.flow, jitter.abs().mean())
    assert torch.isclose(l1.velocity, (jitter[:, 1:] - jitter[:, :-1]).abs().mean())


def test_bad_flow_options():
    with pytest.raises(ValueError, match="loss_type"):
        RectifiedFlow(loss_type="huber")
    with pytest.raises(ValueError, match="time_sampling"):
        RectifiedFlow(time_sampling="beta")
    with pytest.raises(ValueError, match="shape"):
        RectifiedFlow().loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_condition_dropout():
    b = 4000
    conditions = {"wa": torch.ones(b, 5, 2), "wr": torch.ones(b, 2), "we": torch.ones(b, 1, 7),
                  "prev_x": torch.ones(b, 3, 2), "prev_wa": None}
    dropped, masks = ConditionDropout.for_float()(conditions, generator=torch.Generator().manual_seed(0))
    assert set(masks) == {"wa", "wr", "we", "prev_x"} and dropped["prev_wa"] is None
    assert all(torch.equal(v, torch.ones_like(v)) for v in conditions.values() if v is not None)
    for name, rate in (("wa", 0.1), ("wr", 0.1), ("we", 0.1), ("prev_x", 0.5)):
        assert abs(masks[name].float().mean().item() - rate) < 0.03, name
        rows = dropped[name].flatten(1)
        assert torch.equal(rows.sum(1) == 0, masks[name]), name
    assert not torch.equal(masks["wa"], masks["wr"])  # independent draws
    never, always = ConditionDropout({"wa": 0.0}), ConditionDropout({"wa": 1.0})
    assert not never({"wa": torch.ones(8, 2)})[1]["wa"].any()
    assert always({"wa": torch.ones(8, 2)})[0]["wa"].abs().sum() == 0
    with pytest.raises(ValueError, match="probabilities"):
        ConditionDropout({"wa": 1.5})


def _counting(velocity):
    calls = []

    def wrapped(t, x):
        calls.append(float(t))
        return velocity(t, x)
    return wrapped, calls


@pytest.mark.parametrize("method,nfe,expected", [("euler", 1, 1), ("euler", 7, 7), ("midpoint", 10, 10),
                                                 ("midpoint", 3, 2), ("rk4", 8, 8), ("rk4", 10, 8)])
def test_fixed_step_methods_use_nfe_evaluations(method, nfe, expected):
    field, calls = _counting(lambda t, x: -x)
    x1 = FlowSampler(method, nfe=nfe).solve(field, torch.ones(2, 3))
    assert len(calls) == expected
    assert torch.isfinite(x1).all()


def test_solver_accuracy_grows_with_order_and_nfe():
    x0 = torch.ones(1, 4, dtype=torch.float64)
    exact = x0 * math.exp(-1.0)
    error = {(m, n): (FlowSampler(m, nfe=n).solve(lambda t, x: -x, x0) - exact).abs().max().item()
             for m, n in (("euler", 4), ("euler", 16), ("midpoint", 16), ("rk4", 16))}
    assert error[("euler", 16)] < error[("euler", 4)]
    assert error[("rk4", 16)] < error[("midpoint", 16)] < error[("euler", 16)]
    # a straight-path (constant) velocity is integrated exactly by a single Euler step
    v = torch.randn(1, 4, dtype=torch.float64)
    assert torch.allclose(FlowSampler("euler", nfe=1).solve(lambda t, x: v, x0), x0 + v)


def test_dopri5_is_adaptive():
    x0 = torch.ones(1, 4, dtype=torch.float64)
    counts = {}
    for tol in (1e-3, 1e-9):
        field, calls = _counting(lambda t, x: -x * (1 + 3 * t))
        out = FlowSampler("dopri5", nfe=10, atol=tol, rtol=tol).solve(field, x0)
        counts[tol] = len(calls)
        assert torch.allclose(out, x0 * math.exp(-2.5), atol=10 * tol + 1e-9)
    assert counts[1e-9] > counts[1e-3]
    assert FlowSampler("dopri5").num_steps is None


def test_sampler_rejects_bad_options():
    with pytest.raises(SamplerConfigError, match="unknown ODE method"):
        FlowSampler("heun")
    with pytest.raises(SamplerConfigError, match="below one rk4 step"):
        FlowSampler("rk4", nfe=3)


def test_guidance_combination():
    assert GuidanceScales(1.0, 1.0, 1.0).coefficients() == {"full": 1.0}
    assert GuidanceScales(2.0, 1.0, 1.0).coefficients() == {"uncond": -1.0, "audio_only": 1.0, "full": 1.0}
    values = {"full": torch.tensor(1.0), "audio_only": torch.tensor(10.0), "uncond": torch.tensor(100.0),
              "no_ref": torch.tensor(1000.0)}
    requested = []

    def run(branches):
        requested.append(set(branches))
        assert all(branches[name] == cond for name, cond in branches.items())
        return {name: values[name] for name in branches}

    a, e, r = 1.5, 3.0, 2.5
    out = guided_velocity(run, GuidanceScales(a, e, r))
    u, ao, f, nr = values["uncond"], values["audio_only"], values["full"], values["no_ref"]
    assert torch.isclose(out, u + a * (ao - u) + e * (f - ao) + (r - 1) * (f - nr))
    assert requested[-1] == {"uncond", "audio_only", "full", "no_ref"}
    guided_velocity(run, GuidanceScales(1.0, 2.0, 1.0))
    assert requested[-1] == {"audio_only", "full"}  # the unconditional branch cancels


def _recording_field(log, velocity_scale=0.0):
    def field(t, x, cond, prev_x, prev_cond):
        log.append({"t": float(t), "cond": cond.clone(), "prev_x": prev_x.clone(), "prev_cond": prev_cond.clone()})
        velocity = velocity_scale * cond.mean(-1, keepdim=True).expand_as(x)
        return torch.cat([torch.full_like(prev_x, 99.0), velocity], dim=1)  # previous part is dropped
    return field


def test_windowed_sampling_continuity_and_padding():
    cond = torch.arange(2 * 11 * 3, dtype=torch.float32).view(2, 11, 3)
    log = []
    sampler = FlowSampler("euler", nfe=2)
    out = sample_in_windows(sampler, _recording_field(log, 1.0), cond, window=4, num_prev=2, latent_dim=5, seed=0)
    assert out.shape == (2, 11, 5)
    assert len(log) == 3 * 2  # three windows, two evaluations each
    windows = [log[2 * k] for k in range(3)]
    assert torch.equal(windows[0]["prev_x"], torch.zeros(2, 2, 5))
    assert torch.equal(windows[0]["prev_cond"], torch.zeros(2, 2, 3))
    assert torch.equal(windows[1]["cond"], cond[:, 4:8])
    assert torch.equal(windows[2]["cond"][:, :3], cond[:, 8:11])
    assert torch.equal(windows[2]["cond"][:, 3], cond[:, 10])  # padded by repeating the last frame
    for k in (1, 2):
        assert torch.equal(windows[k]["prev_cond"], windows[k - 1]["cond"][:, -2:])
        assert torch.equal(windows[k]["prev_x"], out[:, 4 * k - 2:4 * k])


def test_window_noise_fresh_repeated_and_seeded():
    cond = torch.zeros(1, 8, 2)
    zero_field = _recording_field([])
    run = lambda **kw: sample_in_windows(FlowSampler("euler", nfe=1), zero_field, cond, window=4, num_prev=1,
                                         latent_dim=3, **kw)
    fresh, repeated = run(seed=5), run(seed=5, repeat_window_noise=True)
    assert torch.equal(fresh, run(seed=5))
    assert torch.equal(repeated[:, :4], repeated[:, 4:])
    assert not torch.equal(fresh[:, :4], fresh[:, 4:])
    assert torch.equal(fresh[:, :4], repeated[:, :4])
    with pytest.raises(SamplerConfigError, match="num_prev"):
        sample_in_windows(FlowSampler(), zero_field, cond, window=4, num_prev=5, latent_dim=3)
