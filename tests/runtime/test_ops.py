"""torch.library registration: opcheck of every fastssl op, torch.compile(fullgraph) == eager."""
import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import backends

from helpers import assert_ce_within


def _op_samples(dtype):
    """One representative call per registered op: (op name, args)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    labels7 = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    return [
        ("info_nce", (rand(7, 5), rand(7, 5), None, labels7, labels7, torch.arange(7) * 0 - 1, 2.0, False)),
        ("info_nce", (rand(7, 5), rand(9, 5), None, torch.arange(7), torch.arange(9), None, 3.0, True)),
        ("info_nce", (rand(6, 5), rand(11, 5), rand(6, 5), None, None, None, 1.5, False)),
        ("info_nce_self", (rand(9, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 5]), True, 2.0)),
        ("info_nce_self", (rand(9, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 5]), False, 2.0)),
        ("info_nce_self_decoupled", (rand(8, 5), torch.arange(4).repeat(2), True, 2.0)),
        # row 2 has no positive; rows 0 and 1 share a positive, row 0 has two exclusions
        ("info_nce_masked", (rand(4, 5), rand(7, 5), torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 1, -1, 3, -1, 3]),
                             torch.tensor([-1, -1, 0, 0, -1, 3, -1]), torch.rand(4, generator=g, dtype=dtype), 2.0,
                             True)),
        ("barlow_twins", (rand(7, 5), rand(7, 5), 5e-3)),
        ("vicreg_variance_covariance", (rand(7, 3, 5), rand(7, 3, 5), 1e-4)),
        ("vicreg", (rand(7, 3, 5), rand(7, 3, 5), 2.0, 3.0, 0.5, 1e-3, "gram")),
        ("soft_cross_entropy_pairs", (torch.softmax(rand(2, 5, 9, grad=False), -1), rand(4, 5, 9), 10.0)),
        ("linear_soft_cross_entropy_pairs", (torch.softmax(rand(2, 5, 9), -1), rand(4, 5, 3), rand(9, 3), 10.0)),
        ("linear_distillation", (rand(5, 3), rand(5, 4), rand(9, 3), rand(9, 4), rand(9), 2.0, 3.0, 0, False)),
        # Sinkhorn targets are constants: the teacher's side takes no gradient
        ("linear_distillation", (rand(5, 3), rand(5, 3, grad=False), rand(9, 3), rand(9, 3, grad=False), None, 2.0, 3.0,
                                 3, False)),
        ("linear_cross_entropy", (rand(7, 3), rand(9, 3), rand(9), torch.tensor([0, 8, -100, 3, 3, -100, 1]), -100, 0.1)),
        ("kmeans_assign", (rand(7, 5, grad=False), rand(4, 5, grad=False))),
        ("mutual_nearest_neighbors", (rand(3, 7, 5, grad=False), rand(3, 2, 4, 5, grad=False))),
        ("mutual_nearest_neighbors", (rand(3, 7, 2, grad=False), rand(3, 1, 9, 2, grad=False))),
        ("negative_cosine_similarity", (rand(7, 5), rand(7, 5), 1e-8)),
        ("koleo", (rand(7, 5), 2.0, 1e-8, None)),
        ("koleo", (rand(6, 5), 3.0, 1e-3, 3)),  # groups of 3 rows, another p
        ("co2", (torch.nn.functional.normalize(rand(6, 5), dim=1), torch.nn.functional.normalize(rand(6, 5), dim=1),
                 None, 1.0, 5.0)),
        ("co2", (rand(6, 5), rand(6, 5), torch.nn.functional.normalize(rand(9, 5, grad=False), dim=1), 1.0, 5.0)),
        # β = 1: TiCo stops the gradient through the batch's share of C' (lightly's detach), which a
        # numerical derivative of the value would see; a covariance is symmetric
        ("tico", (rand(7, 5), rand(7, 5), (lambda c: c @ c.T)(rand(5, 5, grad=False)), 1.0, 3.0)),
        ("mmcr", (rand(5, 2, 4), rand(5, 2, 4), 0.1)),
        ("frossl", (rand(3, 7, 5), 0.5)),
        ("emp_ssl", (rand(2, 7, 5), 0.2, 10.0)),
        ("hypersphere_uniformity", (rand(2, 7, 5), 2.0)),
        ("gram_anchoring", (torch.nn.functional.normalize(rand(2, 6, 4), dim=-1),
                            torch.nn.functional.normalize(rand(2, 6, 4, grad=False), dim=-1), 1)),
        ("gram_anchoring", (rand(1, 7, 3), rand(1, 7, 3, grad=False), 2)),
        ("patch_kernel_alignment", (rand(2, 6, 4), rand(2, 6, 4, grad=False), torch.ones(2, 6, dtype=dtype))),
        ("whitening", (rand(2, 7, 3), None, None, 0.1)),
        ("whitening", (rand(2, 7, 3), rand(3, grad=False), (lambda c: c @ c.T + torch.eye(3, dtype=dtype))(
            rand(3, 3, grad=False)), 0.0)),
        ("wmse", (rand(2, 2, 2, 7, 3), None, None, 0.0)),
        ("dse", (torch.nn.functional.normalize(rand(3, 5, 4), dim=-1), torch.tensor([[0, 0, 1, 1, 2]] * 3),
                 torch.tensor([[0, 1, 1, 2, 3]] * 2 + [[0, 0, 1, 1, 1]]), rand(3, 5, 4, grad=False), 2, 4)),
        ("sigreg_sums", (rand(2, 7, 5), torch.nn.functional.normalize(rand(5, 6, grad=False), dim=0),
                         torch.linspace(0, 3, 4, dtype=dtype))),
        # eps 0.5: the shape loss detaches its std (lightly's), so a numerical derivative of the value
        # differs from its gradient: no gradcheck below; tests/sliced checks it against autograd of float64
        ("visreg_shape", (rand(2, 9, 5), torch.nn.functional.normalize(rand(5, 7, grad=False), dim=0), 0.5)),
        ("sinkhorn", (rand(7, 11, grad=False), 3, 0.05, None, None, 0.0, False)),
        ("msn_anchor_terms", (torch.softmax(rand(4, 9), -1), torch.nn.functional.normalize(rand(12, 5), dim=1),
                              torch.nn.functional.normalize(rand(9, 5), dim=1), 10.0)),
        ("sinkhorn", (rand(7, 11, grad=False), 50, 0.1, torch.rand(11, generator=g, dtype=dtype) + 0.5,
                      torch.rand(7, generator=g, dtype=dtype) + 0.5, 1e-3, False)),
        ("mae", (rand(2, 5, 6), rand(2, 5, 6, grad=False), torch.tensor([[1.0, 0, 1, 1, 0], [0, 1, 0, 0, 1]]), 1,
                 True)),
        # MAE on images (2, 3, 4, 6) read as their (N, h, w, p, p, C) patch view: a strided target
        ("mae", (rand(2, 2, 3, 2, 2, 3), rand(2, 3, 4, 6, grad=False).view(2, 3, 2, 2, 3, 2).permute(0, 2, 4, 3, 5, 1),
                 torch.tensor([[[1.0, 0, 1], [1, 1, 0]], [[0, 1, 0], [0, 0, 1]]]), 3, True)),
        ("wav2vec2_contrastive", (rand(2, 5, 4), rand(2, 5, 4), torch.tensor([[[1, 3], [2, 0], [4, 4], [0, 1], [2, 3]]] * 2),
                                  0.5)),
        ("hubert", (rand(7, 5), rand(6, 5), torch.tensor([0, 1, 5, 2, 2, 3, 0]),
                    torch.tensor([0.5, 0.0, 0.25, 0.25, 1.0, 0.0, 0.5], dtype=dtype), 0.5)),
    ]


def _overload(fn):
    """The op behind a registered backend function (a wrapper exposes it as ``.op``)."""
    return fn if isinstance(fn, torch._ops.OpOverload) else fn.op  # a core wrapping its op exposes it


# Ops whose torch backend is plain PyTorch operations (autograd differentiates it, Dynamo traces
# it): no torch.library op to opcheck; their gradcheck and compile tests below still run.
# mmcr and emp_ssl compose ops checked in tests/spectral (nuclear_norm, total_coding_rate) with plain ones;
# wmse composes whitening with plain ones; dse composes nuclear_norm and effective_dimensionality
# (opchecked in tests/regularizers/test_dse.py) with plain ones.
PLAIN_PYTORCH_OPS = {"mmcr", "emp_ssl", "wmse", "dse"}


def _torch_backend(name):
    return backends.implementation(name, "torch").fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_every_registered_op(dtype):
    samples = _op_samples(dtype)
    assert {name for name, _ in samples} == set(backends.ops()), "every registered op needs a sample here"
    for name, args in samples:
        if name in PLAIN_PYTORCH_OPS:
            continue
        torch.library.opcheck(_overload(_torch_backend(name)), args)


@pytest.mark.parametrize("name,args", [pytest.param(n, a, id=n) for n, a in _op_samples(torch.float64)
                                       if n not in ("sinkhorn", "kmeans_assign", "mutual_nearest_neighbors",
                                                 "visreg_shape")])  # no gradient; visreg_shape: see above
def test_torch_backend_op_gradcheck(name, args):
    op = _torch_backend(name)
    if name == "tico":  # its second output, the covariance state, carries no gradient (as in lightly)
        op = lambda *inputs: _torch_backend("tico")(*inputs)[0]  # noqa: E731
    differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def call(*xs):
        full = list(args)
        for i, x in zip(differentiable, xs):
            full[i] = x
        return op(*full)

    assert torch.autograd.gradcheck(call, [args[i] for i in differentiable])


VICREGL_GRIDS = 100 * torch.rand(3, 9, 2, 2, 2, generator=torch.Generator().manual_seed(5))
PROTOTYPES = torch.randn(11, 13, generator=torch.Generator().manual_seed(6))  # a last layer of 11 prototypes
MLM_LABELS = torch.tensor([3, -100, 0, 10, -100, 7, 7, -100, 1])
IBOT_MASK = torch.arange(18).reshape(3, 2, 3) % 2 == 0  # 9 masked tokens, as many as rows in a view


def _losses():
    """(id, function of two (B, D) views) for every public loss."""
    center = torch.randn(13)
    wmse_permutations = torch.stack([torch.randperm(39, generator=torch.Generator().manual_seed(s)) for s in range(2)])
    slices = torch.nn.functional.normalize(torch.randn(13, 6), dim=0)
    sigreg_grid = fastssl.sliced.sigreg_grid(5, 2.0)
    prototypes = torch.randn(7, 13)
    return [
        ("nt_xent", lambda a, b, be: fn.nt_xent(a, b, backend=be)),
        ("nt_xent_labels", lambda a, b, be: fn.nt_xent(a, b, labels=torch.arange(a.shape[0]) % 3, backend=be)),
        ("clip", lambda a, b, be: fn.clip_loss(a, b, 14.0, backend=be)),
        ("barlow_twins", lambda a, b, be: fn.barlow_twins(a, b, backend=be)),
        ("vicreg", lambda a, b, be: fn.vicreg(a, b, backend=be)),
        ("swav", lambda a, b, be: fn.swav([a, b], [a * 0.5], backend=be)),
        ("dino", lambda a, b, be: fn.dino([a, b], [a, b, 0.5 * a], center, backend=be)),
        ("linear_distillation", lambda a, b, be: fn.linear_distillation_loss(
            a, b, PROTOTYPES, teacher_weight=PROTOTYPES.flip(0), center=center[:11], student_temp=0.1, teacher_temp=0.04,
            backend=be)),
        ("linear_distillation_sinkhorn", lambda a, b, be: fn.linear_distillation_loss(
            a, b.detach(), PROTOTYPES, student_temp=0.1, teacher_temp=0.04, centering="sinkhorn", backend=be) + b.sum()),
        ("masked_lm", lambda a, b, be: fn.masked_lm_loss(a, PROTOTYPES, MLM_LABELS, backend=be) + fn.masked_lm_loss(
            b.view(3, 3, 13), PROTOTYPES, MLM_LABELS.view(3, 3), bias=center[:11], label_smoothing=0.1, backend=be)),
        ("negative_cosine", lambda a, b, be: fn.negative_cosine_similarity(a, b, backend=be)),
        ("koleo", lambda a, b, be: fn.koleo(a, backend=be) + fn.koleo(b, backend=be)),
        ("koleo_groups", lambda a, b, be: fn.koleo(a, group_size=3, backend=be) + fn.koleo(b, group_size=9, backend=be)),
        ("capi", lambda a, b, be: sum(  # each view the student once: the teacher is detached
            fn.capi(x.view(3, 3, 13), y.view(3, 3, 13), backend=be) for x, y in ((a, b), (b, a)))),
        ("capi_teacher_index", lambda a, b, be: sum(
            fn.capi(x.view(3, 3, 13), y.view(3, 3, 13)[:, :2], torch.tensor([[2, 0]] * 3), backend=be)
            for x, y in ((a, b), (b, a)))),
        ("gram_anchoring", lambda a, b, be: sum(  # each view the student once: the Gram teacher is detached
            fn.gram_anchoring_loss(x.view(3, 3, 13), y.view(3, 3, 13), img_level=level, backend=be)
            for x, y, level in ((a, b, True), (b, a, False)))),
        ("dcl", lambda a, b, be: fn.dcl(a, b, 0.2, backend=be)),
        ("dclw", lambda a, b, be: fastssl.DCLWLoss(0.2, backend=be)(a, b)),
        ("macl", lambda a, b, be: fn.macl(a, b, 0.2, 1.0, 0.5, backend=be)),
        ("co2", lambda a, b, be: fn.co2(a, b, backend=be)),
        ("detcon", lambda a, b, be: fn.detcon(a.view(3, 3, 13), b.view(3, 3, 13), b.view(3, 3, 13).flip(0),
                                              a.view(3, 3, 13) * 2, torch.tensor([[0, 1, 1]] * 3),
                                              torch.tensor([[1, 0, 2]] * 3), 0.2, backend=be)),
        ("patch_kernel_alignment", lambda a, b, be: sum(  # each view the student once: the teacher is detached
            fn.patch_kernel_alignment(x.view(3, 3, 13), y.view(3, 3, 13), backend=be) for x, y in ((a, b), (b, a)))),
        ("tico", lambda a, b, be: fn.tico(a, b, torch.eye(13), 0.5, backend=be)[0]),
        ("mmcr", lambda a, b, be: fn.mmcr(a.reshape(9, 1, 13), b.reshape(9, 1, 13), 0.1, backend=be)),
        ("frossl", lambda a, b, be: fn.frossl([a, b], backend=be)),
        ("emp_ssl", lambda a, b, be: fn.emp_ssl([a, b], backend=be)),
        ("hypersphere", lambda a, b, be: fn.hypersphere(a, b, 2.0, backend=be)),
        ("vicregl", lambda a, b, be: fn.vicregl(  # maps of 2×2 cells of 3 features, on fixed grids
            [(a, a[:, :12].reshape(9, 2, 2, 3)), (b, b[:, 1:].reshape(9, 2, 2, 3))], [VICREGL_GRIDS[0], VICREGL_GRIDS[1]],
            [(0.5 * a, b[:, :3].reshape(9, 1, 1, 3))], [VICREGL_GRIDS[2][:, :1, :1]], num_matches=(3, 2), backend=be)),
        # fixed permutations: a draw inside the compiled function would differ from the eager call's
        ("wmse", lambda a, b, be: fn.wmse(torch.cat([a, b]).view(-1, 3), w_iter=2, w_size=13, eps=0.1,
                                          permutations=wmse_permutations, backend=be)[0]),
        ("whiten", lambda a, b, be: (fn.whiten(a.reshape(39, 3), 0.1, backend=be)[0] * b.reshape(39, 3)).sum()),
        # no dse: its k-means stops on the data (lightly's `if shift < tol`), a graph break by nature
        # the sliced losses on slices drawn once here (a draw inside would differ between the two runs)
        ("sigreg", lambda a, b, be: fastssl.sliced.sigreg_statistic(torch.stack([a, b]), slices, *sigreg_grid,
                                                                    backend=be)),
        ("visreg_shape", lambda a, b, be: backends.implementation("visreg_shape", be).fn(torch.stack([a, b]),
                                                                                          slices, 1e-4)),
        ("msn", lambda a, b, be: fn.msn(torch.cat([a, b]), a + b, prototypes, backend=be)),
        ("pmsn", lambda a, b, be: fn.pmsn(torch.cat([a, b]), a - b, prototypes, sinkhorn_iterations=0, backend=be)),
        # the MAE target gets no gradient: each view the prediction once; images (1, 3, 6, 6) of 2×2 patches
        ("mae", lambda a, b, be: fn.mae_loss(a.view(1, 9, 13), b.view(1, 9, 13), torch.arange(9).view(1, 9) % 2,
                                             backend=be) + fn.mae_loss(b[:, :12].reshape(1, 9, 12),
                                                                       a[:, :12].reshape(1, 3, 6, 6), torch.ones(1, 9),
                                                                       patch_size=2, backend=be)),
        # fixed distractors: a draw inside the compiled function would differ from the eager call's
        ("wav2vec2", lambda a, b, be: fn.wav2vec2_contrastive_loss(
            a.view(3, 3, 13), b.view(3, 3, 13), negative_indices=torch.tensor([[[1, 2], [0, 2], [1, 1]]] * 3),
            codevector_logits=a[:, :12].reshape(9, 2, 6), backend=be)),
        ("hubert", lambda a, b, be: fn.hubert_loss(a.view(3, 3, 13), torch.tensor([[0, 4, 8], [2, 2, 5], [7, 1, 3]]), b,
                                                   torch.tensor([[True, False, True]] * 3), pred_nomask_weight=0.5,
                                                   backend=be)),
        ("ibot", lambda a, b, be: fn.ibot_patch(a, b, center, IBOT_MASK, backend=be)),
        ("ibot_plus_plus", lambda a, b, be: fn.ibot_plus_plus_patch(a.view(3, 3, 13), b.view(3, 3, 13), center,
                                                                    IBOT_MASK[:, 0], visible_loss_weight=0.5,
                                                                    backend=be)),
        ("dino_sinkhorn_knopp", lambda a, b, be: fn.dino([a, b], [a, b, 0.5 * a], None, center_mode="sinkhorn_knopp",
                                                         backend=be)),
    ]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name,loss", [pytest.param(n, f, id=n) for n, f in _losses()])
def test_compile_fullgraph_equals_eager(name, loss, backend):
    torch._dynamo.reset()
    a = torch.randn(9, 13, requires_grad=True)
    b = torch.randn(9, 13, requires_grad=True)
    eager = loss(a, b, backend)
    eager_grads = torch.autograd.grad(eager, (a, b))
    compiled = torch.compile(lambda x, y: loss(x, y, backend), fullgraph=True, backend="aot_eager")(a, b)
    compiled_grads = torch.autograd.grad(compiled, (a, b))
    # Bit for bit: aot_eager runs the traced graph on the eager ATen kernels, in the same order,
    # and the custom ops are opaque to it.
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compile_with_inductor():
    """One loss through the default Inductor backend as well (the others use aot_eager, faster).
    Inductor generates its own code for the glue around the ops (its own rounding), so the result
    is checked against float64 within the derived bound, as the eager backends are."""
    torch._dynamo.reset()
    a, b = torch.randn(9, 13, requires_grad=True), torch.randn(9, 13, requires_grad=True)
    compiled = torch.compile(lambda x, y: fastssl.NTXentLoss(backend="torch")(x, y), fullgraph=True)
    exact = fn.nt_xent(a.double(), b.double(), backend="reference")
    assert_ce_within(compiled(a, b), exact, 13, 2.0, 17, 18)  # D = 13, τ = 0.5, 2B − 1 candidates, 2B rows
