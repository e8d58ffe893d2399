import math

import pytest
import torch

from lightning_nan.core.norms import any_nonfinite, iter_tensors, tensor_norms, total_norm


def test_per_tensor_norms_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).to(torch.bfloat16), torch.randn(2, 2, 2, generator=g)]
    norms = tensor_norms(tensors)
    assert norms.dtype == torch.float32 and norms.shape == (3,)
    for n, t in zip(norms, tensors):
        assert n.item() == pytest.approx(t.double().norm().item(), rel=1e-5)
    assert total_norm(norms).item() == pytest.approx(
        torch.cat([t.double().flatten() for t in tensors]).norm().item(), rel=1e-5
    )


def test_total_norm_equals_torch_clip_grad_norm():
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(4, 4, generator=g)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    ours = total_norm(tensor_norms([p.grad for p in params])).item()
    theirs = torch.nn.utils.clip_grad_norm_(params, max_norm=1e9).item()
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("ord_", [2.0, math.inf])
def test_one_bad_element_flags_exactly_its_tensor(bad, ord_):
    tensors = [torch.ones(10), torch.ones(10), torch.ones(10)]
    tensors[1][7] = bad
    norms = tensor_norms(tensors, ord_)
    assert torch.isfinite(norms).tolist() == [True, False, True]
    assert bool(any_nonfinite(norms))


def test_max_norm_does_not_overflow_on_huge_finite_values():
    huge = torch.full((4,), 1e38)
    assert bool(torch.isfinite(tensor_norms([huge], math.inf)).all())
    assert not bool(torch.isfinite(tensor_norms([huge], 2.0)).all())  # documented: the 2-norm overflows


def test_half_precision_norms_are_computed_in_float32():
    t = torch.full((100,), 60000.0, dtype=torch.float16)  # the fp16 2-norm (600000) overflows 65504
    assert tensor_norms([t]).item() == pytest.approx(600000.0, rel=1e-3)


def test_empty_input():
    assert tensor_norms([]).numel() == 0
    assert total_norm(tensor_norms([])).item() == 0.0


def test_iter_tensors_walks_nested_batches():
    from dataclasses import dataclass

    @dataclass
    class Sample:
        image: torch.Tensor
        label: torch.Tensor
        name: str

    batch = {"a": (torch.zeros(1), torch.arange(3)), "s": Sample(torch.ones(2), torch.tensor([1]), "x"), "n": None}
    paths = [p for p, _ in iter_tensors(batch)]
    assert paths == ["['a'][0]", "['s'].image"]  # integer tensors and strings are skipped


def test_norms_of_parameters_record_no_autograd_history():
    p = torch.nn.Parameter(torch.ones(3))
    assert not tensor_norms([p]).requires_grad


def test_float64_and_mixed_dtypes():
    """A float64 model (or a mix) gets its norms too, in float32, matching a float64 reference."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, generator=g, dtype=torch.float64), torch.randn(3, generator=g), torch.randn(2, 2, generator=g).half()]
    got = tensor_norms(tensors)
    assert got.dtype == torch.float32
    want = torch.tensor([float(t.double().norm()) for t in tensors], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    assert tensor_norms([torch.tensor([1.0, float("nan")], dtype=torch.float64)]).isnan().all()


def test_complex_tensors_get_the_norm_of_their_magnitudes():
    """The fused float32 kernel refuses complex input: their norms are taken in their own precision."""
    tensors = [torch.tensor([3 + 4j, 0j], dtype=torch.complex64), torch.tensor([1j], dtype=torch.complex128), torch.ones(4)]
    assert tensor_norms(tensors).tolist() == [5.0, 1.0, 2.0]
    assert tensor_norms([torch.tensor([complex(1, float("inf"))], dtype=torch.complex64)]).isinf().all()


@pytest.mark.parametrize("ord_", [2.0, math.inf])
def test_an_empty_tensor_has_norm_zero(ord_):
    """FSDP2 leaves some ranks an empty part of a parameter; torch refuses the inf-norm of an empty tensor."""
    norms = tensor_norms([torch.zeros(0, 3), torch.tensor([3.0, -4.0]), torch.zeros(0)], ord_)
    assert norms.tolist() == [0.0, 5.0 if ord_ == 2.0 else 4.0, 0.0]
    assert tensor_norms([torch.zeros(0)], ord_).tolist() == [0.0]
