"""fastssl's microbenchmarks: every loss, every backend on this machine, and peers when installed.

Two ways to run the same cases (``bench/bench_<family>.py``):

* ``pytest bench/ --benchmark-only [--bench-set quick|full|smoke] [--bench-device cpu|cuda]``
  (pytest-benchmark's tables, peak memory in each benchmark's ``extra_info``);
* ``python -m bench.report [--quick | --full]``: fwd, bwd and fwd+bwd time, peak memory and the
  GEMM floor as CSV, JSON, a markdown report and scaling-curve PNGs under
  ``bench/results/<machine-key>/<size-set>/``.

Only fastssl's public API (``fastssl`` modules, ``fastssl.functional``, ``backend=``) and
``fastssl.backends`` are used, so backends that land later are benchmarked without a change here.
"""
