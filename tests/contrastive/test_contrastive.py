"""Contrastive losses: ``info_nce``, ``nt_xent``, ``clip_loss``, ``NTXentLoss``, ``MemoryBankModule``.

Every value is checked against an independent float64 formula written here (lightly 1.6's
``NTXentLoss`` code for the default, the textbook definitions for the rest), never against
fastssl's own reference. Backends that run on the CPU are all checked.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastssl import MemoryBankModule, NTXentLoss, backends, clip_loss, info_nce, nt_xent

from helpers import (BACKENDS_ON_CPU, normalized_entry_error, FLOAT_DTYPES, HALF_DTYPES, U32, assert_ce_within, assert_info_nce_grads_within,
                     assert_within, bank_blocks, block_sizes, ce_bound, cross_blocks, gamma,
                     half_error_within_twice_reference, logit_error, simclr_blocks, unit_roundoff)
from oracles import (clip_formula, cross_entropy_formula, lightly_moco, lightly_nt_xent, lightly_nt_xent_in_dtype,
                     moco_formula, multi_positive_rows, multi_view_formula, symmetric_formula)

pytestmark = pytest.mark.parametrize("backend", BACKENDS_ON_CPU)

RAGGED_SHAPES = [
    pytest.param(7, 37, id="B7-D37"),
    pytest.param(1, 5, id="B1-D5"),
    pytest.param(8, 16, id="B8-D16"),
    pytest.param(13, 3, id="B13-D3"),
]
TEMPERATURES = [pytest.param(t, id=f"tau{t}") for t in (0.5, 0.1, 0.07, 0.01)]
REDUCTIONS = ["mean", "sum", "none"]


def views_for(batch, dim, dtype=torch.float32, n_views=2, scale=1.0, noise=0.5):
    """Correlated views: a shared signal plus noise, so positives are meaningfully closer."""
    base = torch.randn(batch, dim, dtype=torch.float64)
    return [((base + noise * torch.randn(batch, dim, dtype=torch.float64)) * scale).to(dtype)
            for _ in range(n_views)]


def with_grad(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ============================================================================================
# 1. The lightly default: SimCLR, two views
# ============================================================================================
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("batch, dim", RAGGED_SHAPES)
def test_ntxent_default_equals_lightly_formula(backend, batch, dim, temperature, dtype):
    out0, out1 = with_grad(*views_for(batch, dim, dtype))
    loss = NTXentLoss(temperature=temperature, backend=backend)(out0, out1)
    x0, x1 = with_grad(out0.double(), out1.double())
    expected = lightly_nt_xent(x0, x1, temperature)
    assert loss.dtype == dtype and loss.dim() == 0
    u = unit_roundoff(dtype)
    assert_ce_within(loss, expected, dim, 1 / temperature, 2 * batch - 1, 2 * batch, u=u)
    loss.backward()
    expected.backward()
    assert out0.grad.dtype == dtype and out1.grad.dtype == dtype
    assert_info_nce_grads_within([out0.grad, out1.grad], [x0.grad, x1.grad], torch.cat([x0, x1]),
                                 simclr_blocks(2, batch), 1 / temperature, u)


def test_ntxent_single_sample_is_zero(backend):
    # B = 1: each row's only candidate is its positive, so the loss is exactly log 1 = 0.
    out0, out1 = torch.randn(1, 5), torch.randn(1, 5)
    loss = nt_xent(out0, out1, backend=backend)
    assert lightly_nt_xent(out0, out1, 0.5).item() == 0.0
    assert loss.item() == 0.0


@pytest.mark.parametrize("scale", [pytest.param(1e3, id="x1e3"), pytest.param(1e-3, id="x1e-3"),
                                   pytest.param(3e4, id="x3e4")])
@pytest.mark.parametrize("temperature", [pytest.param(0.01, id="tau0.01"), pytest.param(0.05, id="tau0.05")])
def test_ntxent_low_temperature_unnormalised_inputs(backend, temperature, scale):
    out0, out1 = views_for(9, 33, scale=scale, noise=2.0)
    loss = nt_xent(out0, out1, temperature=temperature, backend=backend)
    expected = lightly_nt_xent(out0, out1, temperature)
    assert torch.isfinite(loss)
    assert expected.item() > 1.0  # the logits span ~2/τ: a real low-temperature stress
    assert_ce_within(loss, expected, 33, 1 / temperature, 17, 18)


SATURATED_BANK = F.normalize(torch.randn(20, 16, generator=torch.Generator().manual_seed(1)), dim=1)
SATURATED_CASES = [  # (loss, float64 formula, the logit blocks of a batch)
    pytest.param(lambda a, b, be: nt_xent(a, b, negatives=SATURATED_BANK, temperature=0.01, backend=be),
                 lambda a, b: moco_formula(a, b, SATURATED_BANK, 0.01), lambda batch: bank_blocks(batch, 20),
                 id="bank-tau0.01"),
    pytest.param(lambda a, b, be: nt_xent(a, b, temperature=0.01, backend=be),
                 lambda a, b: lightly_nt_xent_in_dtype(a, b, 0.01), lambda batch: simclr_blocks(2, batch),
                 id="nt_xent-tau0.01"),
    pytest.param(lambda a, b, be: clip_loss(a, b, 100.0, backend=be),
                 lambda a, b: clip_formula(a, b, 100.0),
                 lambda batch: cross_blocks(torch.eye(batch, dtype=torch.bool), symmetric=True), id="clip-scale100"),
]


@pytest.mark.parametrize("loss_fn, formula, blocks", SATURATED_CASES)
def test_saturated_softmax_fp32_accuracy(backend, loss_fn, formula, blocks):
    # Strongly aligned views at τ = 0.01 (CLIP's logit scale 100): each positive takes almost all
    # of its row's softmax, the loss is ~1e-6 and 1 − p is near fp32 resolution. Value and
    # gradients against float64 within the derived bounds (ce_bound, info_nce_grad_bound),
    # whose absolute parts, (M + 2)u and 4u per positive, are all fp32 can resolve here.
    # (test_saturated_rows_keep_their_digits checks the log-softmax form row by row.)
    out0, out1 = views_for(8, 16, noise=0.5)
    got0, got1 = with_grad(out0, out1)
    loss = loss_fn(got0, got1, backend)
    exact0, exact1 = with_grad(out0.double(), out1.double())
    exact = formula(exact0, exact1)
    assert exact.item() < 1e-3  # saturated indeed
    blocks = blocks(8)
    candidates, rows = block_sizes(blocks)
    assert_ce_within(loss, exact, 16, 100.0, candidates, rows)
    for t in (loss, exact):
        t.backward()
    vectors = torch.cat([exact0, exact1] + ([SATURATED_BANK.double()] if len(blocks[0][1]) > 16 else []))
    assert_info_nce_grads_within([got0.grad, got1.grad], [exact0.grad, exact1.grad], vectors, blocks, 100.0)


def test_saturated_rows_keep_their_digits(backend):
    """Per-row losses from 1e-6 to 0.03 at τ = 0.01 (logits ~100, whose ulp is 128u) within the
    derived per-row bound 3δs·ℓ + (M + 2)u, through both row paths (InfoNCE, SimCLR's
    self-similarity); the bound is tight enough that logsumexp − positive fails it."""
    g = torch.Generator().manual_seed(2)
    centre = F.normalize(torch.randn(16, generator=g, dtype=torch.float64), dim=0)
    keys = F.normalize(centre + 0.12 * torch.randn(12, 16, generator=g, dtype=torch.float64), dim=1)
    query = (keys + 0.003 * torch.randn(12, 16, generator=g, dtype=torch.float64)).float()
    key = keys.float()
    unit = F.normalize(torch.cat([query, key]), dim=1)  # the self-similarity core takes unit rows
    self_core = backends.select("info_nce_self", backend, (unit,))[1]
    pairs = torch.arange(12).repeat(2)
    cases = [  # (fp32 rows, float64 rows, candidates per row, logits and positives of the bad form)
        (info_nce(query, key, 0.01, reduction="none", backend=backend)[0],
         info_nce(query.double(), key.double(), 0.01, reduction="none", backend="reference")[0], 12,
         F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / 0.01, torch.arange(12)),
        (self_core(unit, pairs, True, 100.0), self_core(unit.double(), pairs, True, 100.0), 23,
         (unit @ unit.T / 0.01).fill_diagonal_(float("-inf")), (torch.arange(24) + 12) % 24),
    ]
    for got, exact, candidates, logits, positive in cases:
        assert 1e-7 < exact.min() and exact.max() < 0.1  # saturated rows
        bound = ce_bound(exact, 16, 100.0, candidates)
        assert_within(got, exact, bound, "row losses")
        lse_minus_positive = torch.logsumexp(logits, dim=1) - logits[torch.arange(len(positive)), positive]
        assert ((lse_minus_positive.double() - exact).abs() > bound).any()  # the bound catches the bad form


def test_ntxent_extreme_magnitude_fp32(backend):
    # Finite fp32 inputs whose squared norm overflows fp32 (|x| ~ 1e20): normalisation must not
    # turn them into zero vectors (which silently gives log(2B - 1) whatever the inputs).
    out0, out1 = views_for(6, 10, scale=1e20, noise=0.3)
    loss = nt_xent(out0, out1, temperature=0.1, backend=backend)
    expected = lightly_nt_xent(out0, out1, 0.1)
    assert torch.isfinite(loss)
    assert_ce_within(loss, expected, 10, 10.0, 11, 12)


def test_ntxent_fp16_inputs_whose_squares_overflow_fp16(backend):
    # |x| ~ 1000 in fp16: x² overflows fp16, but arithmetic runs in fp32, so the loss is the
    # float64 formula on the same (exactly representable) fp16 inputs to fp32 accuracy.
    out0, out1 = views_for(10, 24, dtype=torch.float16, scale=1000.0)
    assert torch.isinf(out0.float().pow(2).sum(1).half()).any()
    loss = nt_xent(out0, out1, temperature=0.1, backend=backend)
    assert loss.dtype == torch.float32
    assert_ce_within(loss, lightly_nt_xent(out0, out1, 0.1), 24, 10.0, 19, 20)


# ============================================================================================
# 2. Memory bank (MoCo)
# ============================================================================================
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_memory_bank_first_call_without_grad_uses_random_bank_and_keeps_it(backend, dtype):
    size, batch, dim = 11, 5, 7
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(size, dim), backend=backend)
    out0, out1 = views_for(batch, dim, dtype)
    loss = criterion(out0, out1)  # no grad: the bank (created at construction) is not updated
    bank = criterion.memory_bank.bank
    assert bank.shape == (size, dim) and bank.dtype == torch.float32  # float32 whatever the input, as in lightly
    u = unit_roundoff(dtype)
    # ‖x̂‖ of entries each off by (D/2 + 4)u relative: the norm is off by as much, plus the
    # float64 norm's own D-term rounding (negligible)
    assert_within(bank.double().norm(dim=1), torch.ones(size, dtype=torch.float64), normalized_entry_error(dim),
                  "bank row norms")
    assert int(criterion.memory_bank.bank_ptr) == 0
    # Random, not the batch: no bank row equals a normalised out1 row.
    assert not torch.isclose(bank.double() @ F.normalize(out1.double(), dim=1).T,
                             torch.ones((), dtype=torch.float64)).any()
    assert_ce_within(loss, lightly_moco(out0, out1, bank, 0.2), dim, 5.0, 1 + size, batch, u=u)
    # A second no-grad call sees (and leaves) the same bank.
    loss_again = criterion(out0, out1)
    assert torch.equal(criterion.memory_bank.bank, bank)
    torch.testing.assert_close(loss_again, loss, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_memory_bank_first_call_with_grad_uses_bank_before_update(backend, dtype):
    size, batch, dim = 11, 4, 6
    out0, out1 = views_for(batch, dim, dtype)
    # Two criteria created from the same RNG state draw the same initial bank; the one called
    # without gradients keeps it, so it shows the bank the other one used before its update.
    torch.manual_seed(123)
    witness = NTXentLoss(temperature=0.3, memory_bank_size=(size, dim), backend=backend)
    witness(out0, out1)
    initial_bank = witness.memory_bank.bank.clone()
    torch.manual_seed(123)
    criterion = NTXentLoss(temperature=0.3, memory_bank_size=(size, dim), backend=backend)
    q = out0.clone().requires_grad_(True)
    loss = criterion(q, out1)
    u = unit_roundoff(dtype)
    assert_ce_within(loss, lightly_moco(out0, out1, initial_bank, 0.3), dim, 1 / 0.3, 1 + size, batch,
                                                                                         u=u)
    bank = criterion.memory_bank.bank
    exact_rows = F.normalize(out1.double(), dim=1)
    # the float32 bank (lightly's) rounds the normalised rows once more
    assert_within(bank[:batch], exact_rows, (normalized_entry_error(dim, u) + U32) * exact_rows.abs(), "bank rows")
    assert torch.equal(bank[batch:], initial_bank[batch:])
    assert int(criterion.memory_bank.bank_ptr) == batch


def test_memory_bank_cuts_the_batch_at_the_end_like_lightly(backend):
    size, batch, dim, tau = 10, 4, 5, 0.2
    criterion = NTXentLoss(temperature=tau, memory_bank_size=(size, dim), backend=backend)
    expected_bank = None
    pointer = 0
    # the bank holds fastssl's fp32 normalisation of each out1: each entry within
    # normalized_entry_error of float64's F.normalize (0 for the untouched random rows)
    entry_error = normalized_entry_error(dim)
    for step in range(4):  # writes rows 0-3, 4-7, 8-9 (the rest of the batch is dropped), 0-3
        out0, out1 = views_for(batch, dim)
        out0.requires_grad_(True)
        if expected_bank is None:
            criterion(out0.detach(), out1)  # create the random bank without updating it
            expected_bank = criterion.memory_bank.bank.double()
            written = torch.zeros(size, 1, dtype=torch.bool)
        before = criterion.memory_bank.bank.clone()
        assert_within(before, expected_bank, entry_error * expected_bank.abs() * written, f"bank before step {step}")
        loss = criterion(out0, out1)
        assert_ce_within(loss, lightly_moco(out0.detach(), out1, before, tau), dim, 1 / tau, 1 + size,
                                                                                               batch)
        rows = list(range(pointer, min(pointer + batch, size)))
        expected_bank[rows] = F.normalize(out1.double(), dim=1)[:len(rows)]
        written[rows] = True
        pointer = 0 if pointer + batch >= size else pointer + batch
        assert_within(criterion.memory_bank.bank, expected_bank, entry_error * expected_bank.abs() * written,
                      f"bank after step {step}")
        assert int(criterion.memory_bank.bank_ptr) == pointer, f"step {step}"
    assert pointer == 4


def test_memory_bank_unchanged_without_grad(backend):
    criterion = NTXentLoss(memory_bank_size=(9, 6), backend=backend)
    out0, out1 = views_for(4, 6)
    criterion(out0.requires_grad_(True), out1)
    bank, pointer = criterion.memory_bank.bank.clone(), int(criterion.memory_bank.bank_ptr)
    for _ in range(3):
        a, b = views_for(4, 6)
        criterion(a, b)
        leaf = a.clone().requires_grad_(True)
        with torch.no_grad():  # evaluation: the model's output does not require grad
            criterion(leaf * 1.0, b)
    assert torch.equal(criterion.memory_bank.bank, bank)
    assert int(criterion.memory_bank.bank_ptr) == pointer


def test_memory_bank_gradients_match_formula(backend):
    criterion = NTXentLoss(temperature=0.15, memory_bank_size=(12, 8), backend=backend)
    out0, out1 = views_for(5, 8)
    criterion(out0, out1)
    bank = criterion.memory_bank.bank.clone()
    a, b = with_grad(out0, out1)
    criterion(a, b).backward()
    x0, x1 = with_grad(out0.double(), out1.double())
    lightly_moco(x0, x1, bank, 0.15).backward()
    assert_info_nce_grads_within([a.grad, b.grad], [x0.grad, x1.grad], torch.cat([x0, x1, bank.double()]),
                                 bank_blocks(5, 12), 1 / 0.15)


def test_memory_bank_failed_call_leaves_bank_untouched(backend):
    criterion = NTXentLoss(memory_bank_size=(8, 6), backend=backend)
    out0, out1 = views_for(4, 6)
    criterion(out0.requires_grad_(True), out1)
    bank, pointer = criterion.memory_bank.bank.clone(), int(criterion.memory_bank.bank_ptr)
    bad0 = torch.randn(3, 6, requires_grad=True)  # batch 3 against out1's batch 4
    with pytest.raises(ValueError, match="out0.*out1"):
        criterion(bad0, torch.randn(4, 6))
    assert torch.equal(criterion.memory_bank.bank, bank)
    assert int(criterion.memory_bank.bank_ptr) == pointer


def test_memory_bank_buffers_are_not_in_the_state_dict_like_lightly(backend):
    # lightly registers bank and bank_ptr with persistent=False: a lightly checkpoint of a MoCo
    # criterion has no keys for them and loads with strict=True; loading leaves the bank as it is.
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(8, 5), backend=backend)
    assert list(criterion.state_dict()) == [] and list(MemoryBankModule((8, 5)).state_dict()) == []
    assert {name for name, _ in criterion.named_buffers()} == {"memory_bank.bank", "memory_bank.bank_ptr"}
    out0, out1 = views_for(3, 5)
    criterion(out0.requires_grad_(True), out1)
    bank = criterion.memory_bank.bank.clone()
    criterion.load_state_dict({}, strict=True)
    assert torch.equal(criterion.memory_bank.bank, bank) and int(criterion.memory_bank.bank_ptr) == 3
    moved = criterion.to(torch.float64)  # buffers still follow the module
    assert moved.memory_bank.bank.dtype == torch.float64


@pytest.mark.parametrize("feature_dim_first, shape", [pytest.param(True, (6, 10), id="feature_dim_first"),
                                                      pytest.param(False, (10, 6), id="rows_first")])
def test_memory_bank_module_layout(backend, feature_dim_first, shape):
    del backend  # the bank has no backend; parametrized with the rest of the file
    bank_module = MemoryBankModule((10, 6), feature_dim_first=feature_dim_first)
    first = torch.randn(4, 6)
    output, bank = bank_module(first, update=True)
    assert output is first
    assert bank.shape == shape
    rows = bank.T if feature_dim_first else bank
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(10))
    # The returned bank is a copy from before the update; the next call sees the new rows.
    _, bank_after = bank_module(torch.randn(4, 6), update=False)
    rows_after = bank_after.T if feature_dim_first else bank_after
    torch.testing.assert_close(rows_after[:4], first)
    torch.testing.assert_close(rows_after[4:], rows[4:])


def test_memory_bank_module_disabled_and_sized_up_front(backend):
    del backend
    assert MemoryBankModule(0)(torch.randn(3, 4))[1] is None
    module = MemoryBankModule((7, 5), feature_dim_first=False)
    assert module.bank.shape == (7, 5)  # created at construction when D is known
    with pytest.raises(ValueError, match="output"):
        module(torch.randn(2, 6))


# ============================================================================================
# 3. Beyond lightly: more views, labels, modes, CLIP, conventions
# ============================================================================================
@pytest.mark.parametrize("n_views", [3, 4])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_multi_view_positives(backend, n_views, dtype):
    views = with_grad(*views_for(5, 11, dtype, n_views=n_views))
    loss = nt_xent(*views, temperature=0.3, backend=backend)
    exact_views = with_grad(*[v.double() for v in views])
    expected = multi_view_formula(exact_views, 0.3)
    u = unit_roundoff(dtype)
    assert_ce_within(loss, expected, 11, 1 / 0.3, 5 * n_views - 1, 5 * n_views, u=u)
    loss.backward()
    expected.backward()
    assert_info_nce_grads_within([v.grad for v in views], [v.grad for v in exact_views], torch.cat(exact_views),
                                 simclr_blocks(n_views, 5), 1 / 0.3, u)


@pytest.mark.parametrize("temperature", [-0.5, -0.005, 0.005])
def test_negative_temperature_is_lightlys(backend, temperature):
    # lightly rejects only |τ| < 1e-8: a negative τ flips the sign of every logit. At τ = −0.005
    # the logits reach 200 in magnitude, so exp() needs the shift: the shift-free test must use |scale|.
    out0, out1 = with_grad(*views_for(6, 9))
    loss = NTXentLoss(temperature=temperature, backend=backend)(out0, out1)
    x0, x1 = with_grad(out0.detach().double(), out1.detach().double())
    expected = lightly_nt_xent(x0, x1, temperature)
    assert_ce_within(loss, expected, 9, 1 / abs(temperature), 11, 12)
    loss.backward()
    expected.backward()
    assert_info_nce_grads_within([out0.grad, out1.grad], [x0.grad, x1.grad], torch.cat([x0, x1]),
                                 simclr_blocks(2, 6), 1 / temperature)


def test_two_view_multi_positive_formula_is_lightly(backend):
    # The generic V-view formula with V = 2 reduces to lightly's loss (checks the oracle too).
    out0, out1 = views_for(6, 9)
    torch.testing.assert_close(multi_view_formula([out0, out1], 0.4), lightly_nt_xent(out0, out1, 0.4))
    assert_ce_within(nt_xent(out0, out1, temperature=0.4, backend=backend), multi_view_formula([out0, out1], 0.4),
                     9, 2.5, 11, 12)


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_supervised_labels(backend, n_views, dtype):
    views = with_grad(*views_for(9, 7, dtype, n_views=n_views))
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2])
    loss = nt_xent(*views, temperature=0.2, labels=labels, backend=backend)
    exact_views = with_grad(*[v.double() for v in views])
    expected = multi_view_formula(exact_views, 0.2, labels=labels)
    u = unit_roundoff(dtype)
    assert_ce_within(loss, expected, 7, 5.0, 9 * n_views - 1, 9 * n_views, u=u)
    loss.backward()
    expected.backward()
    assert_info_nce_grads_within([v.grad for v in views], [v.grad for v in exact_views], torch.cat(exact_views),
                                 simclr_blocks(n_views, 9, labels), 5.0, u)
    # Labels change the loss: distinct labels give back the self-supervised loss. Bit for bit:
    # arange·7 is an increasing relabelling of the default arange, so the same positive pairs are
    # found in the same order and the same ops run on the same numbers.
    unsupervised = nt_xent(*views, temperature=0.2, backend=backend)
    distinct = nt_xent(*views, temperature=0.2, labels=torch.arange(9) * 7, backend=backend)
    torch.testing.assert_close(distinct, unsupervised, rtol=0, atol=0)
    assert not torch.isclose(loss, unsupervised, rtol=1e-3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_simcse_mode_is_one_directional(backend, dtype):
    out0, out1 = views_for(7, 13, dtype)
    loss = nt_xent(out0, out1, temperature=0.05, mode="simcse", backend=backend)
    expected = F.cross_entropy(cross_entropy_formula(out0, out1, 0.05), torch.arange(7))
    assert_ce_within(loss, expected, 13, 20.0, 7, 7, u=unit_roundoff(dtype))
    reverse = F.cross_entropy(cross_entropy_formula(out1, out0, 0.05), torch.arange(7))
    assert not torch.isclose(expected, reverse, rtol=1e-3)  # the direction matters
    module = NTXentLoss(temperature=0.05, mode="simcse", backend=backend)(out0, out1)
    torch.testing.assert_close(module, loss, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_symmetric_mode_averages_both_directions(backend, dtype):
    out0, out1 = views_for(7, 13, dtype)
    loss = nt_xent(out0, out1, temperature=0.1, mode="symmetric", backend=backend)
    logits = cross_entropy_formula(out0, out1, 0.1)
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(7)) + F.cross_entropy(logits.T, torch.arange(7)))
    assert_ce_within(loss, expected, 13, 10.0, 7, 14, u=unit_roundoff(dtype))


@pytest.mark.parametrize("mode", ["simcse", "symmetric"])
def test_two_view_modes_with_labels(backend, mode):
    out0, out1 = views_for(8, 6)
    labels = torch.tensor([1, 1, 2, 3, 2, 1, 4, 3])
    loss = nt_xent(out0, out1, temperature=0.25, labels=labels, mode=mode, backend=backend)
    positive = labels[:, None] == labels[None, :]
    everything = torch.ones(8, 8, dtype=torch.bool)
    rows = multi_positive_rows(out0, out1, positive, everything, 0.25).mean()
    expected = rows if mode == "simcse" else 0.5 * (
        rows + multi_positive_rows(out1, out0, positive.T, everything, 0.25).mean())
    assert_ce_within(loss, expected, 6, 4.0, 8, 8 if mode == "simcse" else 16)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_loss_with_learnable_logit_scale(backend, dtype):
    image, text = views_for(6, 10, dtype)
    image, text = with_grad(image, text)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype, requires_grad=True)
    loss = clip_loss(image, text, log_scale.exp(), backend=backend)

    x_image, x_text = with_grad(image.double(), text.double())
    x_log_scale = log_scale.detach().double().requires_grad_(True)
    logits = x_log_scale.exp() * (F.normalize(x_image, dim=1) @ F.normalize(x_text, dim=1).T)
    targets = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    # the scale is a float32 exp() (≤ 2u, then rounded): scale_error 3
    u, scale = unit_roundoff(dtype), math.exp(log_scale.item())
    assert_ce_within(loss, expected, 10, scale, 6, 12, u=u, scale_error=3)
    loss.backward()
    expected.backward()
    assert log_scale.grad is not None and log_scale.grad.dtype == dtype
    assert_within(log_scale.grad, x_log_scale.grad, clip_scale_grad_bound(10, scale, 6, u, scale_error=3),
                  "log-scale gradient")
    blocks = cross_blocks(torch.eye(6, dtype=torch.bool), symmetric=True)
    assert_info_nce_grads_within([image.grad, text.grad], [x_image.grad, x_text.grad], torch.cat([x_image, x_text]),
                                 blocks, scale, u, scale_error=3)
    # A plain float scale (a float64 exp, rounded to float32 in the op) is within the same bound.
    as_float = clip_loss(image, text, math.exp(log_scale.item()), backend=backend)
    assert_ce_within(as_float, expected, 10, scale, 6, 12, u=u, scale_error=3)


def clip_scale_grad_bound(dim, scale, batch, u=U32, scale_error=1):
    """|δ ∂L/∂log σ| of CLIP's loss on B pairs: ∂L/∂log σ = Σ G·s over the 2B² logit uses (G = ∂L/∂s,
    Σ|G| ≤ 2: each half's rows weigh ½/B and Σ_j|p − y| ≤ 2 per row), off by ≤ σ·Σ|δG| + Σ|G|·δs +
    γ_{2B²}·σΣ|G|, with Σ|δG| ≤ 2(2δs + (2B + 3)u) + 4u as in ``info_nce_grad_bound`` (one
    positive per row, total weight 1)."""
    delta_s = logit_error(dim, scale, u, scale_error)
    return scale * (2 * (2 * delta_s + (2 * batch + 3) * u) + 4 * u + 2 * gamma(2 * batch * batch, u)) + 2 * delta_s


CONVENTION_CASES = [
    # (views, mode, directions summed by convention="sum")
    pytest.param(2, "simclr", 2, id="simclr-2views"),
    pytest.param(3, "simclr", 3, id="simclr-3views"),
    pytest.param(2, "simcse", 1, id="simcse"),
    pytest.param(2, "symmetric", 2, id="symmetric"),
]


@pytest.mark.parametrize("n_views, mode, directions", CONVENTION_CASES)
def test_conventions_scale_the_mean(backend, n_views, mode, directions):
    tau = 0.2
    views = views_for(6, 8, n_views=n_views)
    mean = nt_xent(*views, temperature=tau, mode=mode, backend=backend)
    summed = nt_xent(*views, temperature=tau, mode=mode, convention="sum", backend=backend)
    mocov3 = nt_xent(*views, temperature=tau, mode=mode, convention="mocov3", backend=backend)
    # Bit for bit: the conventions are this one multiply of the mean loss by the same number
    # (directions, and directions · 2 · τ formed in Python floats).
    torch.testing.assert_close(summed, directions * mean, rtol=0, atol=0)
    torch.testing.assert_close(mocov3, directions * 2 * tau * mean, rtol=0, atol=0)
    module = NTXentLoss(temperature=tau, mode=mode, convention="mocov3", backend=backend)(*views)
    torch.testing.assert_close(module, mocov3, rtol=0, atol=0)


def test_sum_convention_is_official_simclr(backend):
    # Official SimCLR: the mean loss of the view-0 rows plus the mean loss of the view-1 rows.
    out0, out1 = views_for(7, 9)
    both = torch.cat([out0, out1])
    not_self = ~torch.eye(14, dtype=torch.bool)
    positive = torch.arange(14)[:, None] == ((torch.arange(14) + 7) % 14)[None, :]
    rows = multi_positive_rows(both, both, positive, not_self, 0.5)
    expected = rows[:7].mean() + rows[7:].mean()
    loss = nt_xent(out0, out1, convention="sum", backend=backend)
    assert_ce_within(loss, expected, 9, 2.0, 13, 14, total_weight=2)


def test_mocov3_convention_with_memory_bank(backend):
    tau = 0.2
    out0, out1 = views_for(5, 6)
    bank = F.normalize(torch.randn(9, 6), dim=1)
    loss = nt_xent(out0, out1, temperature=tau, negatives=bank, convention="mocov3", backend=backend)
    exact = lightly_moco(out0, out1, bank, tau)
    # the mean loss's bound, scaled by 2τ, plus that multiply's rounding
    assert_within(loss, 2 * tau * exact, 2 * tau * ce_bound(exact, 6, 1 / tau, 10, 5) + U32 * 2 * tau * exact,
                  "mocov3 loss")
    summed = nt_xent(out0, out1, temperature=tau, negatives=bank, convention="sum", backend=backend)
    assert_ce_within(summed, exact, 6, 1 / tau, 10, 5)


# ============================================================================================
# 4. info_nce
# ============================================================================================
def reduce_rows(rows, cols, reduction, symmetric=False):
    if reduction == "none":
        return rows, cols
    if reduction == "sum":
        return rows.sum() + cols.sum()
    return 0.5 * (rows.mean() + cols.mean()) if symmetric else rows.mean()


def assert_reduced_close(result, expected, reduction, dim, scale, candidates, rows):
    """``ce_bound`` per row ("none"), or for the mean or sum of ``rows`` row losses."""
    if reduction == "none":
        assert isinstance(result, tuple) and len(result) == 2
        for r, e in zip(result, expected):
            assert r.shape == e.shape
            assert_ce_within(r, e, dim, scale, candidates)
    else:
        assert result.dim() == 0
        total_weight = rows if reduction == "sum" else 1.0
        assert_ce_within(result, expected, dim, scale, candidates, rows, total_weight)


NO_COLS = torch.zeros(0, dtype=torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_info_nce_positive_index(backend, reduction):
    query, keys = torch.randn(5, 12), torch.randn(9, 12)
    positive_index = torch.tensor([8, 0, 3, 3, 6])
    result = info_nce(query, keys, 0.3, positive_index, reduction=reduction, backend=backend)
    rows = F.cross_entropy(cross_entropy_formula(query, keys, 0.3), positive_index, reduction="none")
    assert_reduced_close(result, reduce_rows(rows, NO_COLS, reduction), reduction, 12, 1 / 0.3, 9, 5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_info_nce_default_diagonal_positives(backend, reduction):
    query, keys = torch.randn(4, 7), torch.randn(6, 7)  # N < M: extra keys are negatives only
    result = info_nce(query, keys, reduction=reduction, backend=backend)
    rows = F.cross_entropy(cross_entropy_formula(query, keys, 0.1), torch.arange(4), reduction="none")
    assert_reduced_close(result, reduce_rows(rows, NO_COLS, reduction), reduction, 7, 10.0, 6, 4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_info_nce_labels_rows_without_positive_count_as_zero(backend, reduction):
    query, keys = torch.randn(6, 10), torch.randn(8, 10)
    query_labels = torch.tensor([0, 1, 2, 9, 1, 7])  # labels 9 and 7 have no key
    key_labels = torch.tensor([1, 0, 2, 1, 3, 0, 2, 1])
    result = info_nce(query, keys, 0.2, query_labels=query_labels, key_labels=key_labels,
                      reduction=reduction, backend=backend)
    positive = query_labels[:, None] == key_labels[None, :]
    rows = multi_positive_rows(query, keys, positive, torch.ones(6, 8, dtype=torch.bool), 0.2)
    assert rows[3] == 0 and rows[5] == 0 and (rows[[0, 1, 2, 4]] > 0).all()
    assert_reduced_close(result, reduce_rows(rows, NO_COLS, reduction), reduction, 10, 5.0, 8, 6)
    if reduction == "mean":  # the empty rows still count in the mean
        assert_ce_within(result, rows.sum() / 6, 10, 5.0, 8, 6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_info_nce_positive_keys(backend, reduction):
    query, positive_keys, keys = torch.randn(5, 8), torch.randn(5, 8), torch.randn(11, 8)
    result = info_nce(query, keys, 0.07, positive_keys=positive_keys, reduction=reduction, backend=backend)
    rows = torch.stack([lightly_moco(query[i:i + 1], positive_keys[i:i + 1], F.normalize(keys.double(), dim=1), 0.07)
                        for i in range(5)])
    assert_reduced_close(result, reduce_rows(rows, NO_COLS, reduction), reduction, 8, 1 / 0.07, 12, 5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_info_nce_self_index(backend, reduction):
    keys = torch.randn(7, 9)
    query = keys[:5] + 0.1 * torch.randn(5, 9)
    self_index = torch.tensor([0, 1, -1, 3, 4])  # row 2 keeps every key
    positive_index = torch.tensor([5, 6, 2, 0, 1])
    result = info_nce(query, keys, 0.4, positive_index, self_index=self_index, reduction=reduction,
                      backend=backend)
    allowed = torch.ones(5, 7, dtype=torch.bool)
    allowed[[0, 1, 3, 4], [0, 1, 3, 4]] = False
    positive = torch.zeros(5, 7, dtype=torch.bool)
    positive[torch.arange(5), positive_index] = True
    rows = multi_positive_rows(query, keys, positive, allowed, 0.4)
    assert_reduced_close(result, reduce_rows(rows, NO_COLS, reduction), reduction, 9, 2.5, 7, 5)
    if reduction == "none":  # removing a (close) self entry from the denominator lowers the loss
        with_self = info_nce(query, keys, 0.4, positive_index, reduction="none", backend=backend)[0]
        assert (with_self[[0, 1, 3, 4]] > result[0][[0, 1, 3, 4]]).all()
        # bit for bit: row 2 has no self entry, so its logits and reductions are the same ops
        torch.testing.assert_close(with_self[2], result[0][2], rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_info_nce_symmetric(backend, reduction):
    query, keys = torch.randn(6, 10), torch.randn(6, 10)
    result = info_nce(query, keys, 0.1, symmetric=True, reduction=reduction, backend=backend)
    logits = cross_entropy_formula(query, keys, 0.1)
    rows = F.cross_entropy(logits, torch.arange(6), reduction="none")
    cols = F.cross_entropy(logits.T, torch.arange(6), reduction="none")
    assert_reduced_close(result, reduce_rows(rows, cols, reduction, symmetric=True), reduction, 10, 10.0, 6, 12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_info_nce_symmetric_with_labels_rectangular(backend, reduction):
    query, keys = torch.randn(5, 8), torch.randn(7, 8)
    query_labels = torch.tensor([0, 1, 2, 1, 0])
    key_labels = torch.tensor([2, 0, 5, 1, 1, 0, 3])  # keys 2 and 6 are nobody's positive
    result = info_nce(query, keys, 0.3, query_labels=query_labels, key_labels=key_labels, symmetric=True,
                      reduction=reduction, backend=backend)
    positive = query_labels[:, None] == key_labels[None, :]
    rows = multi_positive_rows(query, keys, positive, torch.ones(5, 7, dtype=torch.bool), 0.3)
    cols = multi_positive_rows(keys, query, positive.T, torch.ones(7, 5, dtype=torch.bool), 0.3)
    assert cols[2] == 0 and cols[6] == 0
    assert_reduced_close(result, reduce_rows(rows, cols, reduction, symmetric=True), reduction, 8, 1 / 0.3, 7, 12)


def test_info_nce_without_normalisation(backend):
    query, keys = 0.3 * torch.randn(5, 6), 0.3 * torch.randn(5, 6)
    loss = info_nce(query, keys, 0.5, normalize=False, backend=backend)
    expected = F.cross_entropy(cross_entropy_formula(query, keys, 0.5, normalize=False), torch.arange(5))
    # unnormalised logits s = q·k/τ: |δs| ≤ (D + 2)u·Σ|qᵢkᵢ|/τ (a D-term dot, the scale), then as
    # in ce_bound: δs·min(3L, 2), (rows + 3)u·L, (M + 2)u
    delta_s = 8 * U32 * (query.double().abs() @ keys.double().abs().T).max().item() / 0.5
    assert_within(loss, expected, delta_s * min(3 * expected.item(), 2.0) + 8 * U32 * expected.item() + 7 * U32,
                  "loss")
    normalised = info_nce(query, keys, 0.5, backend=backend)
    assert not torch.isclose(loss, normalised, rtol=1e-3)


# ============================================================================================
# 5. Invariants
# ============================================================================================
@pytest.mark.parametrize("mode", ["simclr", "symmetric"])
def test_swapping_views_keeps_the_loss(backend, mode):
    out0, out1 = views_for(9, 17)
    forward = nt_xent(out0, out1, temperature=0.2, mode=mode, backend=backend)
    swapped = nt_xent(out1, out0, temperature=0.2, mode=mode, backend=backend)
    # Each against the float64 formula, symmetric in the views (another order of sums: not bit
    # for bit between the two).
    exact = lightly_nt_xent(out0, out1, 0.2) if mode == "simclr" else clip_formula(out0.double(), out1.double(), 5.0)
    candidates = 17 if mode == "simclr" else 9
    assert_ce_within(forward, exact, 17, 5.0, candidates, 18)
    assert_ce_within(swapped, exact, 17, 5.0, candidates, 18)


def test_permuting_the_batch_keeps_the_loss(backend):
    out0, out1 = views_for(9, 17)
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 3, 3, 1])
    perm = torch.randperm(9)
    loss = nt_xent(out0, out1, temperature=0.2, labels=labels, backend=backend)
    permuted = nt_xent(out0[perm], out1[perm], temperature=0.2, labels=labels[perm], backend=backend)
    exact = multi_view_formula([out0, out1], 0.2, labels)  # each against float64, as above
    assert_ce_within(loss, exact, 17, 5.0, 17, 18)
    assert_ce_within(permuted, exact, 17, 5.0, 17, 18)


def test_positive_rescaling_keeps_the_loss(backend):
    out0, out1 = views_for(6, 9)
    loss = nt_xent(out0, out1, backend=backend)
    rescaled = nt_xent(5.0 * out0, 0.25 * out1, backend=backend)
    # each against float64 on out0, out1; 5·out0 rounds (u per entry, ≤ 2u on a logit: dim + 1)
    exact = lightly_nt_xent(out0, out1, 0.5)
    assert_ce_within(loss, exact, 9, 2.0, 11, 12)
    assert_ce_within(rescaled, exact, 9 + 1, 2.0, 11, 12)


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="default"),
    pytest.param({"temperature": 0.07, "mode": "symmetric"}, id="symmetric"),
    pytest.param({"temperature": 0.05, "mode": "simcse", "convention": "sum"}, id="simcse-sum"),
])
def test_module_equals_functional(backend, kwargs):
    out0, out1 = views_for(6, 9)
    module = NTXentLoss(backend=backend, **kwargs)(out0, out1)
    functional = nt_xent(out0, out1, backend=backend, **kwargs)
    torch.testing.assert_close(module, functional, rtol=0, atol=0)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    torch.testing.assert_close(NTXentLoss(backend=backend, **kwargs)(out0, out1, labels=labels),
                               nt_xent(out0, out1, labels=labels, backend=backend, **kwargs), rtol=0, atol=0)


def _self_index_blocks():
    """info_nce-self_index's logits: row i against the keys but its self entry, positive 6 − i
    (row 3's positive is its self entry: a row without positive)."""
    allowed = torch.ones(7, 7, dtype=torch.bool)
    allowed[torch.arange(4), torch.arange(4)] = False
    return cross_blocks(torch.eye(7, dtype=torch.bool).flip(1), allowed)


EYE7 = torch.eye(7, dtype=torch.bool)
BACKEND_AGREEMENT_CASES = [  # (loss, inputs, logit scale, blocks, rows of the inputs in the blocks)
    pytest.param(lambda v, b: nt_xent(v[0], v[1], backend=b), 2, lambda v: 2.0, simclr_blocks(2, 7), 2, id="default"),
    pytest.param(lambda v, b: nt_xent(v[0], v[1], v[2], temperature=0.1, backend=b), 3, lambda v: 10.0,
                 simclr_blocks(3, 7), 3, id="3views"),
    pytest.param(lambda v, b: nt_xent(v[0], v[1], labels=torch.tensor([0, 1, 0, 2, 1, 2, 0]), backend=b), 2,
                 lambda v: 2.0, simclr_blocks(2, 7, torch.tensor([0, 1, 0, 2, 1, 2, 0])), 2, id="labels"),
    pytest.param(lambda v, b: nt_xent(v[0], v[1], negatives=v[2], temperature=0.1, backend=b), 3, lambda v: 10.0,
                 bank_blocks(7, 7), 3, id="bank"),
    pytest.param(lambda v, b: nt_xent(v[0], v[1], mode="symmetric", backend=b), 2, lambda v: 2.0,
                 cross_blocks(EYE7, symmetric=True), 2, id="symmetric"),
    pytest.param(lambda v, b: nt_xent(v[0], v[1], mode="simcse", temperature=0.05, backend=b), 2, lambda v: 20.0,
                 cross_blocks(EYE7), 2, id="simcse"),
    pytest.param(lambda v, b: clip_loss(v[0], v[1], v[2][0, 0].abs() + 10.0, backend=b), 3,
                 lambda v: v[2][0, 0].abs().item() + 10.0, cross_blocks(EYE7, symmetric=True), 2, id="clip"),
    pytest.param(lambda v, b: info_nce(v[0], v[1], 0.2, torch.tensor([6, 5, 4, 3, 2, 1, 0]),
                                       self_index=torch.tensor([0, 1, 2, 3, -1, -1, -1]), backend=b), 2,
                 lambda v: 5.0, _self_index_blocks(), 2, id="info_nce-self_index"),
]


@pytest.mark.parametrize("loss_fn, n_inputs, scale, blocks, in_blocks", BACKEND_AGREEMENT_CASES)
def test_backends_agree(backend, loss_fn, n_inputs, scale, blocks, in_blocks):
    """Each backend against the float64 reference on the same inputs, within the derived bounds
    (two float32 backends round differently: never compared with each other)."""
    inputs = views_for(7, 11, n_views=n_inputs)
    got_inputs, exact_inputs = with_grad(*inputs), with_grad(*[x.double() for x in inputs])
    got = loss_fn(got_inputs, backend)
    expected = loss_fn(exact_inputs, "reference")
    scale = scale(inputs)
    candidates, rows = block_sizes(blocks)
    scale_error = 2 if n_inputs > in_blocks else 1  # clip's scale |v|+10 rounds once more
    assert_ce_within(got, expected, 11, scale, candidates, rows, scale_error=scale_error)
    got.backward()
    expected.backward()
    vectors = torch.cat([x.detach() for x in exact_inputs])
    assert_info_nce_grads_within([x.grad for x in got_inputs[:in_blocks]], [x.grad for x in exact_inputs[:in_blocks]],
                                 vectors, blocks, scale, scale_error=scale_error)
    if n_inputs > in_blocks:  # clip: v[2] only feeds the scale
        bound = clip_scale_grad_bound(11, scale, 7, scale_error=scale_error) / scale
        assert_within(got_inputs[2].grad, exact_inputs[2].grad, bound, "scale's input gradient")


# ============================================================================================
# 6. gradcheck in float64
# ============================================================================================
GRADCHECK_CASES = [
    pytest.param(lambda v, b: nt_xent(v[0], v[1], backend=b), 2, id="default"),
    pytest.param(lambda v, b: nt_xent(v[0], v[1], negatives=v[2], temperature=0.2, backend=b), 3,
                 id="bank-negatives"),
    pytest.param(lambda v, b: nt_xent(v[0], v[1], labels=torch.tensor([0, 1, 0]), temperature=0.3, backend=b),
                 2, id="labels"),
    pytest.param(lambda v, b: nt_xent(v[0], v[1], mode="symmetric", temperature=0.3, backend=b), 2,
                 id="symmetric"),
    pytest.param(lambda v, b: nt_xent(v[0], v[1], v[2], temperature=0.4, backend=b), 3, id="3views"),
    pytest.param(lambda v, b: clip_loss(v[0], v[1], v[2][0, 0].exp(), backend=b), 3, id="clip-logit_scale"),
    pytest.param(lambda v, b: info_nce(v[0], v[1], 0.3, torch.tensor([2, 0, 0]),
                                       self_index=torch.tensor([0, -1, 2]), backend=b), 2, id="info_nce-self_index"),
]


@pytest.mark.parametrize("loss_fn, n_inputs", GRADCHECK_CASES)
def test_gradcheck(backend, loss_fn, n_inputs):
    inputs = with_grad(*views_for(3, 4, torch.float64, n_views=n_inputs))
    assert torch.autograd.gradcheck(lambda *v: loss_fn(v, backend), inputs, eps=1e-6, atol=1e-7)


# ============================================================================================
# 7. Half precision
# ============================================================================================
def naive_half_nt_xent(out0, out1, temperature):
    """lightly's formula with every step in the inputs' half dtype (the error budget)."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    batch = out0.shape[0]
    both = torch.cat([out0, out1])
    logits = both @ both.T / temperature
    logits = logits.masked_fill(torch.eye(2 * batch, dtype=torch.bool), float("-inf"))
    targets = (torch.arange(2 * batch) + batch) % (2 * batch)
    return F.cross_entropy(logits, targets)


HALF_CASES = [
    pytest.param("simclr", lightly_nt_xent, naive_half_nt_xent, id="simclr"),
    pytest.param("symmetric", symmetric_formula, symmetric_formula, id="symmetric"),
]


@pytest.mark.parametrize("mode, exact_fn, naive_fn", HALF_CASES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs(backend, dtype, mode, exact_fn, naive_fn):
    tau = 0.1
    out0, out1 = with_grad(*views_for(16, 40, dtype, noise=1.0))
    loss = nt_xent(out0, out1, temperature=tau, mode=mode, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert out0.grad.dtype == dtype and out1.grad.dtype == dtype
    assert torch.isfinite(out0.grad).all() and torch.isfinite(out1.grad).all()

    # Value: fastssl's error against float64 (on the same rounded inputs) vs the naive half error.
    x0, x1 = with_grad(out0.double(), out1.double())
    exact = exact_fn(x0, x1, tau)
    h0, h1 = with_grad(out0, out1)
    naive = naive_fn(h0, h1, tau)
    assert naive.dtype == dtype
    half_error_within_twice_reference(loss.detach(), naive.detach(), exact.detach())

    # Gradients, by the same rule.
    exact.backward()
    naive.backward()
    for got, ref, ex in ((out0.grad, h0.grad, x0.grad), (out1.grad, h1.grad, x1.grad)):
        half_error_within_twice_reference(got, ref, ex)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_with_memory_bank(backend, dtype):
    criterion = NTXentLoss(temperature=0.1, memory_bank_size=(20, 12), backend=backend)
    out0, out1 = views_for(8, 12, dtype)
    criterion(out0, out1)
    bank = criterion.memory_bank.bank.clone()
    q = out0.clone().requires_grad_(True)
    loss = criterion(q, out1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad.dtype == dtype
    # Arithmetic (normalisation included) in fp32 on the half inputs and the stored bank:
    # fp32-level accuracy against float64 on the same inputs.
    exact = lightly_moco(out0, out1, bank, 0.1)
    assert_ce_within(loss, exact, 12, 10.0, 21, 8)


# ============================================================================================
# 8. Bad input
# ============================================================================================
def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD_INPUTS = [
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(5, 8), backend=b), ValueError, r"out0.*out1", id="batch-mismatch"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 7), backend=b), ValueError, r"out0.*out1", id="dim-mismatch"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), _x(4, 9), backend=b), ValueError, r"more_views\[0\]",
                 id="third-view-mismatch"),
    pytest.param(lambda b: nt_xent(_x(8), _x(8), backend=b), ValueError, r"out0.*2 dimensions", id="1d"),
    pytest.param(lambda b: nt_xent(_x(2, 4, 8), _x(2, 4, 8), backend=b), ValueError, r"out0.*2 dimensions",
                 id="3d"),
    pytest.param(lambda b: nt_xent(torch.ones(4, 8, dtype=torch.long), _x(4, 8), backend=b), TypeError, r"out0",
                 id="int-out0"),
    pytest.param(lambda b: nt_xent(_x(4, 8), torch.ones(4, 8, dtype=torch.int32), backend=b), TypeError, r"out1",
                 id="int-out1"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8, dtype=torch.float64), backend=b), TypeError,
                 r"out0.*out1.*dtype", id="dtype-mismatch"),
    pytest.param(lambda b: nt_xent(_x(0, 8), _x(0, 8), backend=b), ValueError, r"out0.*empty", id="empty-batch"),
    pytest.param(lambda b: nt_xent(_x(4, 0), _x(4, 0), backend=b), ValueError, r"out0.*empty", id="empty-dim"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), temperature=0.0, backend=b), ValueError, r"temperature",
                 id="temperature-0"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), temperature=-1e-9, backend=b), ValueError,
                 r"Illegal temperature: abs", id="temperature-tiny-negative"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), temperature=float("nan"), backend=b), ValueError,
                 r"temperature", id="temperature-nan"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), temperature=float("inf"), backend=b), ValueError,
                 r"temperature", id="temperature-inf"),
    pytest.param(lambda b: NTXentLoss(temperature=0.0, backend=b), ValueError, r"temperature",
                 id="module-temperature-0"),
    pytest.param(lambda b: NTXentLoss(temperature=5e-9, memory_bank_size=(8, 4), backend=b), ValueError,
                 r"Illegal temperature: abs\(5e-09\) < 1e-8", id="module-temperature-tiny"),
    pytest.param(lambda b: NTXentLoss(memory_bank_size=8, backend=b), ValueError,
                 r"'size=8' does not specify the feature dimension", id="module-bank-bare-int"),
    pytest.param(lambda b: NTXentLoss(memory_bank_size=(10, -1), backend=b), ValueError,
                 r"Illegal memory bank size \(10, -1\), all entries must be non-negative", id="module-bank-negative"),
    pytest.param(lambda b: MemoryBankModule((4, 2, 3)), ValueError, r"expected a \(num_features, dim\) tuple",
                 id="bank-three-entries"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), labels=torch.arange(5), backend=b), ValueError, r"labels",
                 id="labels-length"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), labels=torch.zeros(4), backend=b), TypeError, r"labels",
                 id="labels-float"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), labels=torch.zeros(4, 1, dtype=torch.long), backend=b),
                 ValueError, r"labels", id="labels-2d"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), mode="simsiam", backend=b), ValueError, r"mode",
                 id="unknown-mode"),
    pytest.param(lambda b: NTXentLoss(mode="moco", backend=b), ValueError, r"mode", id="module-unknown-mode"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), convention="max", backend=b), ValueError, r"convention",
                 id="unknown-convention"),
    pytest.param(lambda b: NTXentLoss(convention="official", backend=b), ValueError, r"convention",
                 id="module-unknown-convention"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), backend="cuda"), ValueError, r"backend",
                 id="unknown-backend"),
    pytest.param(lambda b: NTXentLoss(backend="fast")(_x(4, 8), _x(4, 8)), ValueError, r"backend",
                 id="module-unknown-backend"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), _x(4, 8), mode="simcse", backend=b), ValueError,
                 r"simcse.*two views", id="simcse-3views"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), _x(4, 8), mode="symmetric", backend=b), ValueError,
                 r"symmetric.*two views", id="symmetric-3views"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), negatives=_x(10, 7), backend=b), ValueError, r"negatives",
                 id="negatives-dim"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), negatives=_x(10), backend=b), ValueError, r"negatives",
                 id="negatives-1d"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), negatives=torch.ones(10, 8, dtype=torch.long), backend=b),
                 TypeError, r"negatives", id="negatives-int"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), _x(4, 8), negatives=_x(10, 8), backend=b), ValueError,
                 r"negatives", id="negatives-3views"),
    pytest.param(lambda b: nt_xent(_x(4, 8), _x(4, 8), labels=torch.arange(4), negatives=_x(10, 8), backend=b),
                 ValueError, r"negatives", id="negatives-labels"),
    pytest.param(lambda b: NTXentLoss(memory_bank_size=(8, 8), backend=b)(_x(4, 8), _x(4, 9)), ValueError,
                 r"out0.*out1", id="module-bank-dim-mismatch"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 7), backend=b), ValueError, r"query.*keys", id="info_nce-dim"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), positive_index=torch.tensor([0, 1, 2, 6]), backend=b),
                 ValueError, r"positive_index", id="positive_index-too-large"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), positive_index=torch.tensor([0, -1, 2, 3]), backend=b),
                 ValueError, r"positive_index", id="positive_index-negative"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), positive_index=torch.tensor([0, 1, 2]), backend=b),
                 ValueError, r"positive_index", id="positive_index-length"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), positive_index=torch.zeros(4), backend=b),
                 TypeError, r"positive_index", id="positive_index-float"),
    pytest.param(lambda b: info_nce(_x(6, 8), _x(4, 8), backend=b), ValueError, r"positive_index",
                 id="diagonal-needs-N<=M"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), query_labels=torch.arange(4), backend=b), ValueError,
                 r"key_labels", id="query_labels-alone"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), query_labels=torch.arange(4),
                                    key_labels=torch.arange(5), backend=b), ValueError, r"key_labels",
                 id="key_labels-length"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), positive_keys=_x(4, 7), backend=b), ValueError,
                 r"positive_keys", id="positive_keys-shape"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), positive_keys=_x(4, 8), positive_index=torch.arange(4),
                                    backend=b), ValueError, r"positive_index.*positive_keys", id="two-positive-kinds"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), self_index=torch.tensor([0, 1, 2, 6]), backend=b),
                 ValueError, r"self_index", id="self_index-too-large"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(4, 8), symmetric=True, self_index=torch.arange(4), backend=b),
                 ValueError, r"self_index", id="symmetric-self_index"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), reduction="avg", backend=b), ValueError, r"reduction",
                 id="unknown-reduction"),
    pytest.param(lambda b: info_nce(_x(4, 8), _x(6, 8), temperature=0.0, backend=b), ValueError, r"temperature",
                 id="info_nce-temperature-0"),
    pytest.param(lambda b: clip_loss(_x(4, 8), _x(4, 8), torch.tensor(-1.0), backend=b), ValueError,
                 r"logit_scale", id="clip-negative-scale"),
    pytest.param(lambda b: clip_loss(_x(4, 8), _x(4, 8), torch.ones(2), backend=b), ValueError, r"logit_scale",
                 id="clip-vector-scale"),
    pytest.param(lambda b: clip_loss(_x(4, 8), _x(5, 8), 10.0, backend=b), ValueError,
                 r"image_features.*text_features", id="clip-shape-mismatch"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS)
def test_bad_input_raises(backend, call, error, message):
    with pytest.raises(error, match=message):
        call(backend)
