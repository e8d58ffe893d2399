"""The clipping core against references: torch's own clipping, float64 formulas, the reference zclip package."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nan.core.clipping import (
    AutoClip,
    GradientClipper,
    adaptive_clip_,
    clip_coefficient,
    final_layer_parameters,
)
from lightning_nan.core.norms import tensor_norms


def params_with_grads(seed: int = 0, scale: float = 10.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (8,), (16, 8), (16,), (4, 16), (4,)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return params


def clone_grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_norm_is_bit_identical_to_torch(norm_type, max_norm):
    ours, theirs = params_with_grads(), params_with_grads()
    stats = GradientClipper("norm", max_norm=max_norm, norm_type=norm_type).clip_(ours)
    total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type)
    assert torch.equal(stats.total_norm, total)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("total", [0.0, 0.3, 0.999, 1.0, 7.5, 3e38])
@pytest.mark.parametrize("max_norm", [1.0, 1e-9, math.inf])
def test_coefficient_is_torchs_bit_for_bit_and_1_for_a_non_finite_total(total, max_norm):
    t = torch.tensor(total)
    assert torch.equal(clip_coefficient(t, max_norm), torch.clamp(max_norm / (t + 1e-6), max=1.0))
    for bad in (float("nan"), float("inf")):
        assert clip_coefficient(torch.tensor(bad), max_norm).item() == 1.0


def test_a_norm_bound_under_max_norm_skips_the_multiplication_and_changes_nothing(monkeypatch):
    """A host bound (the guard's) under max_norm: torch's coefficient would be exactly 1, so the gradients
    are left as they are, with no multiplication; at or near max_norm, or without a bound, torch's path."""
    import lightning_nan.core.clipping as clipping

    calls = []
    scale = clipping.scale_grads_
    monkeypatch.setattr(clipping, "scale_grads_", lambda grads, coef: (calls.append(float(coef)), scale(grads, coef)))
    params = params_with_grads(scale=0.01)
    total = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    norms = tensor_norms([p.grad for p in params])
    for max_norm, bound, multiplied in [
        (2 * total, total, False),  # well under: skipped
        (2 * total, None, True),  # no bound: torch's path
        (total * 1.0005, total, True),  # within the margin: torch's path (by 1.0 or a hair under)
        (total / 2, total, True),  # over: clipped
    ]:
        ours, theirs = clone_grads(params), params_with_grads(scale=0.01)
        for p, g in zip(params, ours):
            p.grad = g.clone()
        calls.clear()
        stats = GradientClipper("norm", max_norm=max_norm).clip_(params, norms, bound)
        torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(params, theirs)), (max_norm, bound)
        assert bool(calls) == multiplied, (max_norm, bound)
        assert torch.equal(stats.total_norm, torch.nn.utils.get_total_norm([p.grad for p in params_with_grads(scale=0.01)]))
        assert torch.equal(stats.threshold, torch.tensor(max_norm)) and (multiplied or float(stats.coef) == 1.0)
    # another norm type, or a sharded clipper, does not use a 2-norm bound
    for clipper in (GradientClipper("norm", max_norm=2 * total, norm_type=1.0), GradientClipper("norm", max_norm=2 * total)):
        clipper.sharded = clipper.norm_type == 2.0
        calls.clear()
        if clipper.sharded:
            monkeypatch.setattr(clipping, "total_over_ranks", lambda n, t: clipping.total_norm(n, t))
        clipper.clip_(params, norms, total)
        assert calls


def test_the_norm_bound_skip_matches_torch_where_its_1e_6_dominates():
    """With max_norm near torch's 1e-6 the margin must cover that term too: torch can clip by 0.99999994
    where max_norm equals the norm plus 1e-6 in float32. A grid of tiny gradients and max_norms."""
    from lightning_nan.core import StepGuard

    ulp = 2.0**-43  # float32's step just under 1e-6
    for k in range(0, 24, 2):
        for max_norm in (1e-6 + j / 4 * ulp for j in range(0, 160, 3)):
            ours, ref = torch.nn.Linear(3, 1, bias=False), torch.nn.Linear(3, 1, bias=False)
            for m in (ours, ref):
                m.weight.grad = torch.tensor([[k * ulp, 0.0, 0.0]])
            guard = StepGuard(ours)
            guard.check(torch.optim.SGD(ours.parameters(), lr=0.1), step=0)
            GradientClipper("norm", max_norm=max_norm).clip_(guard.last_grad_params, guard.last_grad_norms, guard.last_grad_norm_bound)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
            assert torch.equal(ours.weight.grad, ref.weight.grad), (k, max_norm)


def test_a_bound_that_came_with_other_norms_is_not_used():
    """Norms of other tensors are recomputed, and the bound that came with them is dropped."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([0.0, 0.01]), torch.tensor([3.0, 4.0])
    norms_a = tensor_norms([a.grad])
    stats = GradientClipper("norm", max_norm=1.0).clip_([a, b], norms_a, 0.01)
    assert float(stats.total_norm) == pytest.approx(math.hypot(0.01, 5.0), rel=1e-6) and float(stats.coef) < 0.2
    assert torch.allclose(b.grad, torch.tensor([0.6, 0.8]), rtol=1e-5)


def test_value_is_bit_identical_to_torch():
    ours, theirs = params_with_grads(), params_with_grads()
    GradientClipper("value", clip_value=3.0).clip_(ours)
    torch.nn.utils.clip_grad_value_(theirs, 3.0)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("method, kwargs", [("norm", {"max_norm": 1.0}), ("autoclip", {}), ("zclip", {"warmup": 1})])
def test_a_nan_total_norm_never_spreads_to_finite_gradients(method, kwargs):
    params = params_with_grads()
    params[0].grad[0, 0, 0, 0] = float("nan")
    before = clone_grads(params)
    clipper = GradientClipper(method, **kwargs)
    stats = clipper.clip_(params)
    assert math.isnan(float(stats.total_norm)) and float(stats.coef) == 1.0
    for b, p in zip(before[1:], params[1:]):
        assert torch.equal(b, p.grad)  # torch's clip_grad_norm_ would have made them all NaN
    if clipper.rule is not None:  # and the NaN step left no trace in the statistics
        state = clipper.rule.state_dict()
        assert _finite_entries(state) == [] or not any(math.isnan(v) for v in _finite_entries(state))
        if "history" in state:
            assert _finite_entries(state) == []  # nothing recorded
        else:
            assert state["seen"] == 0.0


def _finite_entries(state):
    if "history" in state:
        return state["history"]
    return [state["mean"], state["var"]] if state else []


def test_autoclip_matches_a_float64_percentile_of_the_finite_history():
    rule = AutoClip(percentile=10, window=5)
    g = torch.Generator().manual_seed(3)
    seq = (torch.rand(12, generator=g) * 10).tolist()
    seq[4] = float("nan")
    seq[7] = float("inf")
    history: list[float] = []
    for value in seq:
        ours = float(rule.threshold(torch.tensor(value)))
        if math.isfinite(value):
            history = (history + [value])[-5:]
        expected = torch.quantile(torch.tensor(history, dtype=torch.float64), 0.10).item()
        assert ours == pytest.approx(expected, rel=1e-6)


def test_autoclip_clips_to_the_threshold():
    clipper = GradientClipper("autoclip", percentile=50, window=10)
    for scale in (1.0, 1.0, 100.0):
        params = params_with_grads(scale=scale)
        stats = clipper.clip_(params)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
    assert float(stats.coef) < 0.05 and after == pytest.approx(float(stats.threshold), rel=1e-4)


def agc_reference(params, clip_factor, eps):
    """timm's adaptive_clip_grad, in float64: an independent implementation of the paper's rule."""
    out = []
    for p in params:
        w, g = p.detach().double(), p.grad.double()
        dims = tuple(range(1, w.ndim))
        wn = w.norm() if w.ndim <= 1 else torch.linalg.vector_norm(w, dim=dims, keepdim=True)
        gn = g.norm() if g.ndim <= 1 else torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        max_norm = wn.clamp(min=eps) * clip_factor
        out.append(torch.where(gn < max_norm, g, g * (max_norm / gn.clamp(min=1e-6))))
    return out


def test_agc_matches_the_reference_formula():
    params = params_with_grads(scale=0.05)
    for p in params[2:4]:  # small gradients there: those units stay unclipped
        p.grad.mul_(0.01)
    expected = agc_reference(params, 0.01, 1e-3)
    stats = GradientClipper("agc").clip_(params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-5, atol=1e-9)
    assert 0 < float(stats.clipped_units) < 1


def test_agc_leaves_a_non_finite_unit_alone_and_the_excluded_layer_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)
    model[0].weight.grad[2, 1] = float("inf")
    head = final_layer_parameters(model)
    assert head == list(model[2].parameters())
    before = {id(p): p.grad.clone() for p in model.parameters()}
    clipper = GradientClipper("agc")
    clipper.exclude = {id(p) for p in head}
    clipper.clip_(model.parameters())
    w = model[0].weight.grad
    assert torch.equal(w[2], before[id(model[0].weight)][2])  # the unit with the Inf: untouched
    assert bool(torch.isfinite(torch.cat([w[:2].flatten(), w[3:].flatten()])).all())
    assert float(w[0].norm()) < 5.0  # the finite units were clipped
    assert all(torch.equal(p.grad, before[id(p)]) for p in head)
    adaptive_clip_([model[2].weight])  # the function form clips what it is given
    assert not torch.equal(model[2].weight.grad, before[id(model[2].weight)])


@pytest.mark.parametrize("max_norm", [None, 2.5, "defaults"])
def test_zclip_matches_the_reference_package(max_norm):
    zclip = pytest.importorskip("zclip")
    g = torch.Generator().manual_seed(0)
    norms = (torch.rand(90, generator=g) * 2 + 1).tolist()
    norms[40], norms[41], norms[70] = 30.0, 12.0, 9.0  # spikes
    if max_norm == "defaults":  # both packages' own defaults: every step capped at 1.0, the warm-up's too
        reference, ours = zclip.ZClip(), GradientClipper("zclip")
    else:
        reference = zclip.ZClip(alpha=0.97, z_thresh=2.5, max_grad_norm=max_norm, warmup_steps=25)
        ours = GradientClipper("zclip", max_norm=max_norm)
    ref_model = torch.nn.Linear(1, 2, bias=False)
    our_param = torch.nn.Parameter(torch.zeros(2, 1))
    inserted = 0
    for i, n in enumerate(norms):
        if i in (10, 50):  # a NaN step, seen only by ours: it must change nothing
            our_param.grad = torch.tensor([[float("nan")], [0.0]])
            ours.clip_([our_param])
            inserted += 1
        grad = torch.tensor([[0.6 * n], [0.8 * n]])  # total norm n
        ref_model.weight.grad = grad.clone()
        reference.step(ref_model)
        our_param.grad = grad.clone()
        ours.clip_([our_param])
        torch.testing.assert_close(our_param.grad, ref_model.weight.grad, rtol=2e-5, atol=1e-6)
    rule = ours.rule
    assert float(rule.mean) == pytest.approx(reference.mean, rel=1e-5)
    assert float(rule.var) == pytest.approx(reference.var, rel=1e-4)
    assert inserted == 2


def test_rule_state_round_trips():
    for method in ("autoclip", "zclip"):
        a = GradientClipper(method, warmup=2) if method == "zclip" else GradientClipper(method)
        for s in (1.0, 2.0, 3.0, 50.0):
            a.clip_(params_with_grads(scale=s))
        b = GradientClipper(method, warmup=2) if method == "zclip" else GradientClipper(method)
        b.load_state_dict(a.state_dict())
        assert b.state_dict() == a.state_dict()
        pa, pb = params_with_grads(scale=20.0), params_with_grads(scale=20.0)
        a.clip_(pa)
        b.clip_(pb)
        assert all(torch.equal(x.grad, y.grad) for x, y in zip(pa, pb))


@pytest.mark.parametrize(
    "args, match",
    [
        (("norm",), "max_norm"),
        (("value",), "clip_value"),
        (("clipit",), "method"),
        (("autoclip",), None),
    ],
)
def test_arguments_are_checked(args, match):
    if match is None:
        GradientClipper(*args)
        with pytest.raises(ValueError, match="percentile"):
            GradientClipper("autoclip", percentile=0)
        with pytest.raises(ValueError, match="alpha"):
            GradientClipper("zclip", alpha=1.5)
        with pytest.raises(ValueError, match="max_norm"):
            GradientClipper("zclip", max_norm=-1.0)
        return
    with pytest.raises(ValueError, match=match):
        GradientClipper(*args)


def test_agc_refuses_flat_shards_before_touching_the_gradients():
    """FSDP1's flat shards split output units across ranks: AGC would clip by part of a unit's norm."""
    p = torch.nn.Parameter(torch.ones(2, 3))
    p.grad = torch.full((2, 3), 5.0)
    clipper = GradientClipper("agc")
    clipper.sharded = True
    with pytest.raises(ValueError, match=r"GradientClipping\('agc'\) needs each output unit's whole gradient"):
        clipper.clip_([p])
    assert torch.equal(p.grad, torch.full((2, 3), 5.0))
