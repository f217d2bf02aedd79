"""Row-sparse Adam for hash tables (citygen.train.optim) against torch.optim.Adam and closed form."""

from __future__ import annotations

import math

import pytest
import torch

from citygen.train.optim import HashGridAdam, _native_sparse_adam, sparse_adam_reference

HYPER = dict(lr=0.03, betas=(0.9, 0.99), eps=1e-15)


def _steps(optimizer, param, grads):
    for g in grads:
        optimizer.zero_grad(set_to_none=True)
        param.grad = g.clone()
        optimizer.step()


def test_sparse_group_equals_dense_adam_where_every_gradient_is_nonzero():
    torch.manual_seed(0)
    init = torch.randn(1000)
    grads = [torch.randn(1000) for _ in range(5)]
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    _steps(torch.optim.Adam([a], **HYPER), a, grads)
    _steps(HashGridAdam([{"params": [b], "sparse": True}], **HYPER), b, grads)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_untouched_entries_keep_value_and_moments():
    torch.manual_seed(1)
    p = torch.randn(64).requires_grad_()
    opt = HashGridAdam([{"params": [p], "sparse": True}], **HYPER)
    g1 = torch.randn(64)
    _steps(opt, p, [g1])
    before = p.detach().clone()
    m, v = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
    g2 = torch.zeros(64)
    g2[:8] = 1.0
    _steps(opt, p, [g2])
    torch.testing.assert_close(p.detach()[8:], before[8:], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg"][8:], m[8:], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"][8:], v[8:], rtol=0, atol=0)
    # touched entries: the closed-form Adam update at step 2
    b1, b2 = HYPER["betas"]
    m2 = b1 * m[:8] + (1 - b1) * 1.0
    v2 = b2 * v[:8] + (1 - b2) * 1.0
    step = HYPER["lr"] / (1 - b1 ** 2) * m2 / (v2.sqrt() / math.sqrt(1 - b2 ** 2) + HYPER["eps"])
    torch.testing.assert_close(p.detach()[:8], before[:8] - step, rtol=1e-5, atol=1e-7)


def test_dense_groups_are_ordinary_adam():
    torch.manual_seed(2)
    init = torch.randn(50)
    grads = [torch.randn(50) * (torch.rand(50) > 0.5) for _ in range(4)]   # zeros do move dense Adam
    a, b = init.clone().requires_grad_(), init.clone().requires_grad_()
    _steps(torch.optim.Adam([a], **HYPER), a, grads)
    _steps(HashGridAdam([{"params": [b], "sparse": False}], **HYPER), b, grads)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_native_step_matches_the_torch_reference(hashgrid_cpu):
    native = _native_sparse_adam()
    assert native is hashgrid_cpu.sparse_adam  # the optimiser uses the build the fixture checked
    torch.manual_seed(3)
    n = 1 << 17   # above the OpenMP threshold
    p = torch.randn(n)
    g = torch.randn(n) * (torch.rand(n) > 0.7)
    m, v = torch.randn(n) * 0.1, torch.rand(n) * 0.1
    ref = [t.clone() for t in (p, m, v)]
    kw = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-15, bias_correction1=1 - 0.9 ** 7, bias_correction2=1 - 0.99 ** 7)
    native(p, g, m, v, kw["lr"], kw["beta1"], kw["beta2"], kw["eps"], kw["bias_correction1"], kw["bias_correction2"])
    sparse_adam_reference(ref[0], g, ref[1], ref[2], **kw)
    for got, want in zip((p, m, v), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(4)
    grads = [torch.randn(32) * (torch.rand(32) > 0.5) for _ in range(6)]
    a = torch.randn(32).requires_grad_()
    b = a.detach().clone().requires_grad_()
    oa = HashGridAdam([{"params": [a], "sparse": True}], **HYPER)
    _steps(oa, a, grads)
    ob = HashGridAdam([{"params": [b], "sparse": True}], **HYPER)
    _steps(ob, b, grads[:3])
    oc = HashGridAdam([{"params": [b], "sparse": True}], **HYPER)
    oc.load_state_dict(ob.state_dict())
    _steps(oc, b, grads[3:])
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_sparse_groups_refuse_weight_decay():
    with pytest.raises(ValueError, match="weight decay"):
        HashGridAdam([{"params": [torch.zeros(3, requires_grad=True)], "sparse": True, "weight_decay": 0.1}], **HYPER)


def test_kept_gradient_buffers_are_zeroed_in_place_and_train_as_dropped_ones():
    """A parameter registered with ``keep_grad_buffers`` keeps its gradient tensor across
    ``zero_grad`` (zeroed, the same storage: no table-sized allocation a step), the others are
    dropped as before; the steps equal those of an optimizer that drops every gradient."""
    torch.manual_seed(0)
    table0, mlp0 = torch.randn(64, 2), torch.randn(3)
    runs = []
    for keep in (False, True):
        table, mlp = torch.nn.Parameter(table0.clone()), torch.nn.Parameter(mlp0.clone())
        opt = HashGridAdam([{"params": [table]}, {"params": [mlp]}], **HYPER)
        if keep:
            opt.keep_grad_buffers([table])
        buffers = set()
        for k in range(4):
            opt.zero_grad(set_to_none=True)
            rows = torch.arange(k, 64, 5)  # a sparse, moving set of rows, as a hash-grid batch touches
            (table[rows].square().sum() + (mlp * (k + 1)).sum()).backward()
            buffers.add(table.grad.data_ptr())
            opt.step()
        opt.zero_grad(set_to_none=True)
        assert mlp.grad is None
        if keep:
            assert len(buffers) == 1 and table.grad is not None and not table.grad.any()
        else:
            assert table.grad is None
        runs.append((table.detach(), mlp.detach()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
