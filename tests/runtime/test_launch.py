"""What the kernel launchers share (``kernels/launch.py``): the device guard, one-axis grids within
CUDA's limits, float64 scalars as float32 parts, and the autotuner's choice (issue 17 items 4, 9)."""
import contextlib
import importlib
import pkgutil
import struct
from types import SimpleNamespace

import pytest
import torch

import fastssl.functional as fn
from fastssl import backends
from fastssl.kernels import launch
from helpers import assert_within, gamma, unit_roundoff

CUDA_AXIS_1_2_LIMIT = 65_535


# --- grids -----------------------------------------------------------------------------------
def test_flat_grid_is_one_axis_of_every_program():
    assert launch.flat_grid(3, 5, 7) == (105,)
    assert launch.flat_grid(70_000, 70_000 // 1024) == (70_000 * 68,)
    with pytest.raises(ValueError, match="exceeds CUDA's 2147483647 per grid"):
        launch.flat_grid(1 << 16, 1 << 16)


@pytest.mark.triton
@pytest.mark.parametrize("batch, columns", [(1, 1), (33, 65), (4_000_000, 768), (64, 5_000_000)])
def test_normalize_grid_stays_within_cuda_limits(batch, columns):
    from fastssl.kernels import redundancy

    grid = redundancy.normalize_grid(batch, columns)
    assert len(grid) == 1  # axes 1 and 2 (≤ 65,535 programs) unused
    assert grid[0] == -(-batch // redundancy.BLOCK_ROWS) * -(-columns // redundancy.BLOCK_COLUMNS)
    assert -(-columns // redundancy.BLOCK_COLUMNS) > CUDA_AXIS_1_2_LIMIT or columns < 5_000_000


@pytest.mark.triton
@pytest.mark.parametrize("size, block, groups", [(17, 16, 1), (8192, 64, 1), (256, 32, 100_000)])
def test_product_grid_stays_within_cuda_limits(size, block, groups):
    """VICReg's groups once went on axis 2: 100,000 groups is past its limit, fine on axis 0."""
    from fastssl.kernels import redundancy

    tiles = -(-size // block)
    assert redundancy.product_grid(size, block, groups) == (groups * tiles * tiles,)


@pytest.mark.triton
@pytest.mark.parametrize("groups, dim", [(1, 40), (3, 17)], ids=["G1", "G3"])
def test_flat_grid_kernels_cover_every_tile(groups, dim):
    """The decoded (group, i, j) and (row block, column block) of the one-axis grids reach every
    tile: the kernels' outputs equal torch's."""
    from fastssl.kernels import redundancy

    batch = 37
    x = torch.randn(batch, groups * dim, dtype=torch.float64)
    stats = torch.stack([x.mean(0), 1 / x.std(0), x.mean(0), 1 / x.std(0), x[0], x[0]])
    normalized = (x - stats[0]) * stats[1]
    assert torch.equal(redundancy.normalize(x, stats, 0, True), normalized)  # the same two roundings
    views = normalized.view(batch, groups, dim).transpose(0, 1)  # (G, B, D)
    for gram in (True, False):
        norms = redundancy.squared_norms(x, x, stats, (0, 0), groups, gram, False, False, True)
        products, magnitudes = ((v @ v.transpose(1, 2) if gram else v.transpose(1, 2) @ v)
                                for v in (views, views.abs()))
        reduced, entries = (dim, batch * batch) if gram else (batch, dim * dim)
        # each product within γ_R of its magnitude (in the kernel and here), squared: 2 of them
        # twice, plus the sum of the squares
        bound = (4 * gamma(reduced, unit_roundoff(x.dtype)) + gamma(entries, unit_roundoff(x.dtype))) * \
            magnitudes.square().sum((1, 2))
        assert_within(norms, products.square().sum((1, 2)), bound, "squared norms")


# --- device guard ----------------------------------------------------------------------------
class RecordingGuard:
    """Stands in for ``torch.cuda.device``: records the device each launch made current."""

    entered: list = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        RecordingGuard.entered.append(self.device)

    def __exit__(self, *exc):
        return False


def test_on_device_makes_the_tensor_device_current(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", RecordingGuard)
    RecordingGuard.entered = []
    with launch.on_device(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert RecordingGuard.entered == [torch.device("cuda", 1)]
    assert isinstance(launch.on_device(torch.zeros(1)), contextlib.nullcontext)  # CPU: the interpreter



def test_on_input_device_guards_with_the_first_tensor_argument(monkeypatch):
    guarded_with = []

    @contextlib.contextmanager
    def recording(tensor):
        guarded_with.append(tensor)
        yield

    monkeypatch.setattr(launch, "on_device", recording)

    @launch.on_input_device
    def launcher(scale, x, y):
        return scale, x, y

    x, y = torch.zeros(2), torch.ones(3)
    assert launcher(2.0, x, y) == (2.0, x, y)
    assert len(guarded_with) == 1 and guarded_with[0] is x


class CountingKernel:
    """Wraps a Triton kernel: counts its launches and those made inside the launch guard."""

    def __init__(self, kernel, guard_depth):
        self.kernel, self.guard_depth, self.launches, self.unguarded = kernel, guard_depth, 0, 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches += 1
            self.unguarded += self.guard_depth[0] == 0
            return self.kernel[grid](*args, **kwargs)
        return run


def _kernel_modules():
    import fastssl.kernels as package

    return [importlib.import_module(f"fastssl.kernels.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def _run_every_triton_op():
    """Forward and backward of each family's Triton ops, on small CPU tensors (the interpreter)."""
    a, b = torch.randn(12, 16, requires_grad=True), torch.randn(12, 16, requires_grad=True)
    (fn.info_nce(a, b, backend="triton") + fn.barlow_twins(a, b, backend="triton")
     + fn.vicreg(a, b, backend="triton")).backward()
    fn.sinkhorn_knopp(torch.randn(9, 20), backend="triton")
    targets, logits = torch.rand(2, 5, 20, requires_grad=True), torch.randn(3, 5, 20, requires_grad=True)
    pairs = backends.select("soft_cross_entropy_pairs", "triton", [targets, logits])[1](targets, logits, 10.0)
    student, teacher = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8)
    weight = torch.randn(20, 8, requires_grad=True)
    (pairs.sum() + fn.linear_distillation_loss(student, teacher, weight, student_temp=0.1, teacher_temp=0.04,
                                               backend="triton")).backward()


@pytest.mark.triton
def test_every_launch_of_every_kernel_module_runs_under_the_device_guard(monkeypatch):
    """Each launcher makes its inputs' device current (a cuda:1 tensor with cuda:0 current runs on
    cuda:1): every Triton kernel of every kernels/ module is launched inside ``launch.on_device``."""
    import triton

    depth = [0]
    real_guard = launch.on_device

    @contextlib.contextmanager
    def counting_guard(tensor):
        depth[0] += 1
        try:
            with real_guard(tensor):
                yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(launch, "on_device", counting_guard)
    counted = {}
    for module in _kernel_modules():
        for name, kernel in vars(module).items():
            if isinstance(kernel, (triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction)) \
                    and not getattr(kernel, "noinline", False) and name.endswith("_kernel"):
                counted[f"{module.__name__}.{name}"] = CountingKernel(kernel, depth)
                monkeypatch.setattr(module, name, counted[f"{module.__name__}.{name}"])
    for module in _kernel_modules():  # the launchers find on_device by name in their module
        if hasattr(module, "on_device") and module is not launch:
            monkeypatch.setattr(module, "on_device", counting_guard)
    _run_every_triton_op()
    launched = {name: k for name, k in counted.items() if k.launches}
    assert {name.split(".")[2] for name in launched} >= {"clustering", "contrastive", "distillation", "redundancy"}
    assert {name: k.unguarded for name, k in launched.items() if k.unguarded} == {}


# --- float64 scalars, autotuning -------------------------------------------------------------
@pytest.mark.parametrize("value", [20.0, 1 / 3, 1 / 0.07, 12345.678901234, 3.3e-8, 1e30])
def test_float64_parts_are_float32_and_sum_exactly(value):
    parts = launch.float64_parts(value)
    for part in parts:
        assert struct.unpack("f", struct.pack("f", part))[0] == part
    assert (parts[0] + parts[1]) + parts[2] == value


@pytest.mark.parametrize("size, bucket", [(0, 1), (1, 1), (2, 2), (3, 4), (1000, 1024), (1024, 1024), (1025, 2048)])
def test_shape_bucket_is_the_next_power_of_two(size, bucket):
    assert launch.shape_bucket(size) == bucket


def test_autotuner_drops_failing_configs_and_times_each_key_once(monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(launch, "_TUNED", {})
    timed = []

    def time_config(config):
        timed.append(config)
        if config == (128, 128):
            raise OutOfResources(300_000, 232_448, "shared memory")
        return {(64, 64): 2.0, (32, 32): 1.5, (128, 128): 0.1}[config]

    key = ("forward", launch.shape_bucket(1000))
    assert launch.fastest(key, [(64, 64), (128, 128), (32, 32)], time_config) == (32, 32)
    assert launch.fastest(("forward", launch.shape_bucket(1001)), [(64, 64)], time_config) == (32, 32)
    assert timed == [(64, 64), (128, 128), (32, 32)]

    def always_fails(config):
        raise OutOfResources(300_000, 232_448, "shared memory")

    with pytest.raises(OutOfResources):
        launch.fastest("every config fails", [(64, 64), (128, 128)], always_fails)
