"""pytest glue for ``pytest bench/ --benchmark-only``.

The benchmark files are named ``bench_<family>.py`` so that no test run collects them by accident
(the default ``python -m pytest`` only looks in ``tests/``); this file makes pytest collect them
when ``bench/`` is named, and parametrizes each family's test over its cases × providers × modes.
"""
import pytest
import torch

from bench import core


def pytest_addoption(parser):
    group = parser.getgroup("fastssl benchmarks")
    group.addoption("--bench-set", choices=core.SIZE_SETS, default=None,
                    help="case sizes: quick (minutes on a CPU), full (the papers' sizes) or smoke "
                         "(tiny); default: full with CUDA, quick without")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    group.addoption("--bench-dtype", default="float32", help="input dtype (float32, float16, bfloat16)")


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself, whatever its name
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "bench_job" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    size_set = config.getoption("--bench-set") or ("full" if device.type == "cuda" else "quick")
    dtype = getattr(torch, config.getoption("--bench-dtype"))
    jobs = core.jobs(metafunc.module.cases(size_set), device, dtype, size_set)
    metafunc.parametrize("bench_job", jobs, ids=[job.id for job in jobs])
