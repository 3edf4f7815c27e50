"""Random ops on "mlx": the same seed gives exactly the CPU's numbers (torch.manual_seed,
torch.mlx.manual_seed, explicit generators, saved states), every op advances the generator as
the CPU's op advances the CPU generator, and in-place draws write into the existing storage.
OpInfo compares random ops on shapes and dtypes only; these tests compare the values."""
import pytest
import torch

import torch_mlx  # noqa: F401

DRAWS = {
    "rand": lambda d, t: torch.rand(5, 7, dtype=t, device=d),
    "randn": lambda d, t: torch.randn(101, dtype=t, device=d),
    "normal_": lambda d, t: torch.empty(10, 3, dtype=t, device=d).normal_(2, 3),
    "uniform_": lambda d, t: torch.empty(10, 3, dtype=t, device=d).uniform_(-2, 3),
    "exponential_": lambda d, t: torch.empty(50, dtype=t, device=d).exponential_(2),
    "geometric_": lambda d, t: torch.empty(50, dtype=t, device=d).geometric_(0.3),
    "log_normal_": lambda d, t: torch.empty(50, dtype=t, device=d).log_normal_(),
    "cauchy_": lambda d, t: torch.empty(50, dtype=t, device=d).cauchy_(),
    "bernoulli_": lambda d, t: torch.empty(50, dtype=t, device=d).bernoulli_(0.3),
    "bernoulli_tensor": lambda d, t: torch.empty(50, dtype=t, device=d).bernoulli_(
        torch.linspace(0, 1, 50, device=d)),
    "bernoulli": lambda d, t: torch.bernoulli(torch.linspace(0, 1, 50, dtype=t, device=d)),
    "normal_tensors": lambda d, t: torch.normal(torch.arange(6.0, device=d).to(t),
                                                torch.ones(6, device=d).to(t)),
    "normal_mean": lambda d, t: torch.normal(torch.arange(6.0, device=d).to(t), 2.0),
    "normal_std": lambda d, t: torch.normal(1.0, torch.ones(6, device=d).to(t)),
    "normal_floats": lambda d, t: torch.normal(1.0, 2.0, (4, 3), dtype=t, device=d),
    "multinomial": lambda d, t: torch.multinomial(torch.rand(4, 10, device=d).to(t), 5),
    "multinomial_replacement": lambda d, t: torch.multinomial(
        torch.rand(10, device=d).to(t), 20, replacement=True),
    "rand_like": lambda d, t: torch.rand_like(torch.empty(3, 3, dtype=t, device=d)),
    "dropout": lambda d, t: torch.nn.functional.dropout(torch.ones(64, dtype=t, device=d), 0.4),
}
INT_DRAWS = {
    "randint": lambda d, t: torch.randint(0, 2 if t == torch.bool else 100, (20,), dtype=t,
                                          device=d),
    "random_": lambda d, t: torch.empty(20, dtype=t, device=d).random_(),
    "random_to": lambda d, t: torch.empty(20, dtype=t, device=d).random_(
        2 if t == torch.bool else 50),
    "random_from_to": lambda d, t: torch.empty(20, dtype=t, device=d).random_(
        0 if t in (torch.bool, torch.uint8) else -5, 2 if t == torch.bool else 50),
}
OTHER_DRAWS = {
    "randperm": lambda d: torch.randperm(30, device=d),
    "randperm_large": lambda d: torch.randperm(100000, device=d),
    "randperm_out": lambda d: torch.randperm(7, out=torch.empty(0, dtype=torch.int64, device=d)),
    "poisson": lambda d: torch.poisson(torch.rand(10, device=d) * 5),
    "binomial": lambda d: torch.binomial(torch.full((10,), 10.0, device=d),
                                         torch.rand(10, device=d)),
    "standard_gamma": lambda d: torch._standard_gamma(torch.rand(10, device=d) + 0.5),
    "dirichlet": lambda d: torch._sample_dirichlet(torch.rand(3, 4, device=d) + 0.5),
    "normal_out": lambda d: torch.normal(torch.arange(6.0, device=d), 2.0,
                                         out=torch.empty(6, device=d)),
    "strided_normal_": lambda d: torch.empty(6, 4, device=d).t().normal_(),
}


def _same_stream(draw):
    """draw("cpu") and draw("mlx") from the same seed agree exactly, and the generators have
    advanced alike (the next draws agree too)."""
    torch.manual_seed(1234)
    expected, expected_next = draw("cpu"), torch.rand(3)
    torch.manual_seed(1234)
    got, got_next = draw("mlx"), torch.rand(3, device="mlx")
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for e, g in zip(expected, got):
        assert g.device.type == "mlx"
        torch.testing.assert_close(g.cpu(), e, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got_next.cpu(), expected_next, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(DRAWS))
def test_float_draws_equal_the_cpu(name, dtype):
    _same_stream(lambda d: DRAWS[name](d, dtype))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool,
                                   torch.float32])
@pytest.mark.parametrize("name", sorted(INT_DRAWS))
def test_integer_draws_equal_the_cpu(name, dtype):
    _same_stream(lambda d: INT_DRAWS[name](d, dtype))


@pytest.mark.parametrize("name", sorted(OTHER_DRAWS))
def test_other_draws_equal_the_cpu(name):
    _same_stream(OTHER_DRAWS[name])


def test_mlx_manual_seed_explicit_generators_and_saved_state():
    torch.mlx.manual_seed(7)
    first = torch.randn(8, device="mlx").cpu()
    torch.mlx.manual_seed(7)
    torch.testing.assert_close(torch.randn(8, device="mlx").cpu(), first, rtol=0, atol=0)

    state = torch.mlx.get_rng_state()
    a = torch.rand(5, device="mlx").cpu()
    torch.mlx.set_rng_state(state)
    torch.testing.assert_close(torch.rand(5, device="mlx").cpu(), a, rtol=0, atol=0)

    gen, cpu_gen = torch.Generator("mlx"), torch.Generator()
    gen.manual_seed(5)
    cpu_gen.manual_seed(5)
    default_state = torch.mlx.get_rng_state()
    got = torch.empty(10, device="mlx").normal_(generator=gen).cpu()
    torch.testing.assert_close(got, torch.empty(10).normal_(generator=cpu_gen), rtol=0, atol=0)
    assert torch.equal(torch.mlx.get_rng_state(), default_state)  # the default one is untouched
    assert torch.equal(gen.get_state(), cpu_gen.get_state())


@pytest.mark.parametrize("draw", [
    lambda t: t.normal_(), lambda t: t.uniform_(), lambda t: t.bernoulli_(0.5),
    lambda t: t.exponential_(), lambda t: t.random_(0, 10), lambda t: t.cauchy_(),
])
def test_inplace_draws_write_into_the_storage(draw):
    base = torch.zeros(6, 8, device="mlx")
    ptr = base.data_ptr()
    view = base[1:5, ::2]
    assert draw(view) is view
    assert base.data_ptr() == ptr
    written = torch.zeros(6, 8, dtype=torch.bool)
    written[1:5, ::2] = True
    assert (base.cpu()[~written] == 0).all()  # nothing outside the view changed


def test_errors_match_the_cpu():
    with pytest.raises(RuntimeError) as cpu_error:
        torch.empty(3).normal_(0, -1)
    with pytest.raises(RuntimeError) as mlx_error:
        torch.empty(3, device="mlx").normal_(0, -1)
    assert str(mlx_error.value) == str(cpu_error.value)
    with pytest.raises(RuntimeError):
        torch.multinomial(torch.zeros(3, device="mlx"), 2)
