"""linalg on "mlx" beyond OpInfo's forward comparison: LAPACK error reporting (info codes and
LinAlgError for singular or indefinite inputs, where MLX itself would raise or crash), empty
matrices, integer products, gradients, and the CPU's exact small-bmm rounding."""
import pytest
import torch


def _mlx(*tensors):
    return [t.to("mlx") for t in tensors]


def test_singular_matrix_info_codes_match_cpu():
    a = torch.tensor([[[1.0, 2.0], [2.0, 4.0]], [[2.0, 1.0], [1.0, 3.0]]])
    for fn in (torch.linalg.inv_ex, torch.linalg.lu_factor_ex):
        cpu, mlx = fn(a), fn(a.to("mlx"))
        torch.testing.assert_close(mlx[-1].cpu(), cpu[-1])
    # the invertible matrix of the batch still gets its inverse
    torch.testing.assert_close(torch.linalg.inv_ex(a.to("mlx")).inverse[1].cpu(),
                               torch.linalg.inv(a[1]))


def test_singular_matrix_raises_like_cpu():
    a = torch.tensor([[1.0, 2.0], [2.0, 4.0]]).to("mlx")
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.inv(a)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.solve(a, torch.ones(2).to("mlx"))


def test_cholesky_of_indefinite_matrix():
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    torch.testing.assert_close(torch.linalg.cholesky_ex(a.to("mlx")).info.cpu(),
                               torch.linalg.cholesky_ex(a).info)
    with pytest.raises(torch.linalg.LinAlgError, match="order 2"):
        torch.linalg.cholesky(a.to("mlx"))


@pytest.mark.parametrize("fn", [
    torch.linalg.inv, torch.linalg.det, torch.linalg.cholesky, torch.linalg.eigh,
    torch.linalg.svd, torch.linalg.qr, lambda a: torch.linalg.solve(a, a),
    torch.linalg.matrix_exp, torch.linalg.lu_factor,
])
def test_empty_matrices(fn):
    """MLX's LAPACK wrappers abort the process on 0 x 0 inputs; these must return as on CPU."""
    a = torch.zeros(3, 0, 0)
    cpu, mlx = fn(a), fn(a.to("mlx"))
    cpu = cpu if isinstance(cpu, tuple) else (cpu,)
    mlx = mlx if isinstance(mlx, tuple) else (mlx,)
    for c, m in zip(cpu, mlx):
        assert m.shape == c.shape and m.dtype == c.dtype


def test_integer_matmul_is_exact():
    a = torch.randint(-1000, 1000, (3, 4, 5))
    b = torch.randint(-1000, 1000, (3, 5, 2))
    assert torch.equal(torch.bmm(*_mlx(a, b)).cpu(), torch.bmm(a, b))
    assert torch.equal(torch.mm(*_mlx(a[0], b[0])).cpu(), torch.mm(a[0], b[0]))
    assert torch.equal(torch.mv(*_mlx(a[0], b[0, :, 0])).cpu(), torch.mv(a[0], b[0, :, 0]))



@pytest.mark.parametrize("beta, alpha", [(0.2, 0.6), (1.7, 2.6), (-1.5, 3), (2, -0.9)])
def test_integer_add_products_truncate_float_scalars(beta, alpha):
    """For integer tensors the CPU converts float beta/alpha to the integer type (truncating)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-9, 9, (4, 3, 5), generator=g)
    b = torch.randint(-9, 9, (4, 5, 6), generator=g)
    c, v = torch.randint(-9, 9, (3, 6), generator=g), torch.randint(-9, 9, (5,), generator=g)
    cases = [(torch.addbmm, (c, a, b)), (torch.baddbmm, (c.expand(4, 3, 6), a, b)),
             (torch.addmv, (c[:, 0], a[0], v))]
    for fn, args in cases:
        assert torch.equal(fn(*_mlx(*args), beta=beta, alpha=alpha).cpu(),
                           fn(*args, beta=beta, alpha=alpha))


def test_small_bmm_rounds_as_cpu():
    """Below 400 multiply-adds per batch entry torch's CPU bmm sums sequentially over k."""
    torch.manual_seed(0)
    a, b = torch.randn(25, 1, 10) * 8, torch.randn(25, 10, 5) * 8
    assert torch.equal(torch.bmm(*_mlx(a, b)).cpu(), torch.bmm(a, b))
    c = torch.randn(25, 1, 5)
    assert torch.equal(torch.baddbmm(*_mlx(c, a, b), beta=0.5, alpha=2).cpu(),
                       torch.baddbmm(c, a, b, beta=0.5, alpha=2))


def test_addmm_beta_zero_ignores_nan():
    c = torch.full((2, 2), float("nan"))
    a, b = torch.randn(2, 3), torch.randn(3, 2)
    torch.testing.assert_close(torch.addmm(*_mlx(c, a, b), beta=0).cpu(), a @ b)


def test_eig_order_and_vectors_match_cpu():
    torch.manual_seed(0)
    a = torch.randn(4, 6, 6)
    w, v = torch.linalg.eig(a.to("mlx"))
    cw, cv = torch.linalg.eig(a)
    torch.testing.assert_close(w.cpu(), cw)
    torch.testing.assert_close(v.abs().cpu(), cv.abs())


def test_complete_qr_of_tall_matrix():
    torch.manual_seed(0)
    a = torch.randn(2, 6, 3)
    q, r = torch.linalg.qr(a.to("mlx"), mode="complete")
    cq, cr = torch.linalg.qr(a, mode="complete")
    torch.testing.assert_close(q.cpu(), cq)
    torch.testing.assert_close(r.cpu(), cr)


@pytest.mark.parametrize("fn", [
    lambda a, b: torch.linalg.solve(a, b), lambda a, b: torch.linalg.inv(a) @ b,
    lambda a, b: torch.linalg.solve(a, b.mT, left=False),
    lambda a, b: torch.linalg.det(a).sum() * b,
    lambda a, b: torch.linalg.det(a.mT).sum() * b,  # a column-major input: the LU of A itself
    lambda a, b: torch.linalg.slogdet(a).logabsdet.sum() * b,
    lambda a, b: torch.linalg.cholesky(a @ a.mT) @ b,
    lambda a, b: torch.cdist(a, b.mT),
    lambda a, b: torch.linalg.lu_solve(*torch.linalg.lu_factor(a), b),
])
def test_gradients_match_cpu(fn):
    torch.manual_seed(0)
    a = torch.randn(3, 4, 4) + 4 * torch.eye(4)
    b = torch.randn(3, 4, 2)
    grads = []
    for device in ("cpu", "mlx"):
        x, y = (t.to(device).requires_grad_() for t in (a, b))
        out = fn(x, y)
        grads.append([g.cpu() for g in torch.autograd.grad(out, (x, y), torch.ones_like(out))])
    torch.testing.assert_close(grads[1], grads[0])


def test_ldl_of_indefinite_matrices_pivots_as_lapack():
    """OpInfo's samples are positive definite; indefinite ones take 2x2 pivots and swaps."""
    torch.manual_seed(0)
    a = torch.randn(6, 7, 7)
    a = a + a.mT
    a[::2, 0, 0] = 0  # forces an interchange or a 2x2 block at the first step
    cpu, mlx = torch.linalg.ldl_factor_ex(a), torch.linalg.ldl_factor_ex(a.to("mlx"))
    assert torch.equal(mlx.pivots.cpu(), cpu.pivots)
    assert (cpu.pivots < 0).any()
    torch.testing.assert_close(mlx.LD.cpu(), cpu.LD)
    b = torch.randn(6, 7, 2)
    torch.testing.assert_close(torch.linalg.ldl_solve(mlx.LD, mlx.pivots, b.to("mlx")).cpu(),
                               torch.linalg.ldl_solve(cpu.LD, cpu.pivots, b))


def test_float_tolerance_overloads_of_pinv_and_matrix_rank():
    """torch's composites build these tolerances as float64 device tensors; mlx builds them in
    float32 with the same rules and gives the CPU's results."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 4, generator=g)
    a[0, :, 3] = a[0, :, 0]  # rank 3
    h = a @ a.mT
    d = a.to("mlx")
    close = torch.testing.assert_close
    close(torch.linalg.pinv(d, rtol=1e-3).cpu(), torch.linalg.pinv(a, rtol=1e-3))
    close(torch.linalg.pinv(d, atol=0.5).cpu(), torch.linalg.pinv(a, atol=0.5))
    close(torch.linalg.pinv(d).cpu(), torch.linalg.pinv(a))
    close(torch.pinverse(d, 1e-2).cpu(), torch.pinverse(a, 1e-2))
    close(torch.ops.aten.linalg_pinv(d, 1e-2).cpu(), torch.ops.aten.linalg_pinv(a, 1e-2))
    for kwargs in ({}, {"atol": 1.0}, {"rtol": 0.3}, {"atol": 0.1, "rtol": 0.5}):
        assert torch.equal(torch.linalg.matrix_rank(d, **kwargs).cpu(),
                           torch.linalg.matrix_rank(a, **kwargs))
        assert torch.equal(torch.linalg.matrix_rank(h.to("mlx"), hermitian=True, **kwargs).cpu(),
                           torch.linalg.matrix_rank(h, hermitian=True, **kwargs))
    assert torch.equal(torch.ops.aten.linalg_matrix_rank(d, 0.5).cpu(),
                       torch.ops.aten.linalg_matrix_rank(a, 0.5))
    tol = torch.tensor([0.1, 1.0, 3.0])
    assert torch.equal(torch.linalg.matrix_rank(d, atol=tol.to("mlx")).cpu(),
                       torch.linalg.matrix_rank(a, atol=tol))
    assert torch.linalg.matrix_rank(torch.empty(2, 0, 3, device="mlx")).cpu().tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_addr_rounds_each_step_as_cpu(dtype):
    g = torch.Generator().manual_seed(0)
    c, v1, v2 = (torch.randn(*s, generator=g).to(dtype) for s in [(5, 7), (5,), (7,)])
    for beta, alpha in [(1, 1), (0.2, 0.6), (0, 2.0), (1.5, 1)]:
        assert torch.equal(torch.addr(*_mlx(c, v1, v2), beta=beta, alpha=alpha).cpu(),
                           torch.addr(c, v1, v2, beta=beta, alpha=alpha))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_addbmm_accumulates_batch_by_batch_as_cpu(dtype):
    """The CPU adds one product per batch entry into the half result (beta applied once)."""
    g = torch.Generator().manual_seed(0)
    c, a, b = (torch.randn(*s, generator=g).to(dtype) for s in [(5, 7), (6, 5, 4), (6, 4, 7)])
    for beta, alpha in [(1, 1), (0.5, 2.0), (0, 1)]:
        assert torch.equal(torch.addbmm(*_mlx(c, a, b), beta=beta, alpha=alpha).cpu(),
                           torch.addbmm(c, a, b, beta=beta, alpha=alpha))


def test_float_tolerance_pinv_differentiates_without_warnings_and_runs_in_inference_mode():
    import warnings
    x0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    for fn in (lambda x: torch.linalg.pinv(x, rtol=1e-3), torch.pinverse,
               lambda x: torch.ops.aten.linalg_pinv(x, 1e-3)):
        x, xc = x0.to("mlx").requires_grad_(), x0.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "an autograd kernel was not registered"
            fn(x).sum().backward()
        fn(xc).sum().backward()
        torch.testing.assert_close(x.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-4)
        with torch.inference_mode():
            torch.testing.assert_close(fn(x0.to("mlx")).cpu(), fn(x0), rtol=1e-4, atol=1e-4)
