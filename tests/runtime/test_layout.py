"""The layout's rules, read from the sources: no import cycle anywhere in ``fastssl`` (imports inside
functions and the registry's manifest strings count), ``kernels/`` imports nothing of fastssl, the
runtime knows no family, and an eager CPU loss call imports neither triton nor torch._dynamo nor
the C++ build (checked in a fresh process)."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastssl.runtime import registry

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fastssl"
KERNELS = REPO / "kernels"


def module_name(path: Path) -> str:
    """The dotted name a source file is imported as (``kernels/`` installs as ``fastssl.kernels``)."""
    if path.is_relative_to(KERNELS):
        parts = ["fastssl", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = ["fastssl", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) + sorted(KERNELS.glob("*.py"))}


def imported_modules(name: str, path: Path):
    """Every fastssl module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if node.module:  # `from . import x` imports x, not the package it is written in
                found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module in SOURCES and module != name}


def cycles(graph):
    """Every cycle a depth-first walk of ``graph`` (module -> modules it imports) closes."""
    state, found = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_anywhere():
    """Every import, inside functions too, plus the registry's manifest strings (its lazy imports)."""
    graph = {name: imported_modules(name, path) for name, path in SOURCES.items()}
    graph["fastssl.runtime.registry"] |= {entry.split(":")[0] for entries in registry.MANIFEST.values()
                                          for entry in entries.values()}
    found = cycles(graph)
    assert found == [], "import cycles: " + "; ".join(" → ".join(c) for c in found)


def test_kernels_are_a_leaf():
    for name, path in SOURCES.items():
        if name.startswith("fastssl.kernels"):
            outside = {m for m in imported_modules(name, path) if not m.startswith("fastssl.kernels")}
            assert outside == set(), f"{path.relative_to(REPO)} imports {sorted(outside)}"


def test_runtime_knows_no_family():
    families = {name for name, path in SOURCES.items()
                if path.name == "__init__.py" and (path.parent / "op.py").exists()}
    for name, path in SOURCES.items():
        if name.startswith("fastssl.runtime"):
            reached = {m for m in imported_modules(name, path) if m.split(".")[:2] != ["fastssl", "runtime"]}
            assert not reached & families and all(m.rpartition(".")[0] not in families for m in reached), (
                f"{path.relative_to(REPO)} imports {sorted(reached)}")


def test_every_manifest_entry_resolves_to_its_family():
    for op, entries in registry.MANIFEST.items():
        for backend, entry in entries.items():
            module, _, function = entry.partition(":")
            assert module.split(".")[-1] == (backend if backend == "reference" else f"{backend}_backend"), entry
            assert (PACKAGE / Path(*module.split(".")[1:])).with_suffix(".py").exists(), entry
            tree = ast.parse((PACKAGE / Path(*module.split(".")[1:])).with_suffix(".py").read_text())
            defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
                t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)} | {
                a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
            assert function in defined, f"{entry} ({op}, {backend})"


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {module_name(p) for p in PACKAGE.rglob("__init__.py")} | {"fastssl.kernels"}
    assert listed == on_disk


EAGER_PROBE = """
import json, sys
import torch
import fastssl
torch.manual_seed(0)
a, b = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
calls = {
    "NTXentLoss": lambda: fastssl.NTXentLoss()(a, b),
    "NTXentLoss (MoCo)": lambda: fastssl.NTXentLoss(memory_bank_size=(32, 8))(a, b),
    "BarlowTwinsLoss": lambda: fastssl.BarlowTwinsLoss()(a, b),
    "VICRegLoss": lambda: fastssl.VICRegLoss()(a, b),
    "SwaVLoss": lambda: fastssl.SwaVLoss()([a.tanh(), b.tanh()], [a.tanh()]),
    "NegativeCosineSimilarity": lambda: fastssl.NegativeCosineSimilarity()(a, b),
    "DINOLoss": lambda: fastssl.DINOLoss(output_dim=8)([a, b], [a, b, a]),
    "kmeans": lambda: fastssl.kmeans_update(a.detach(), b.detach()[:3], torch.zeros(3))[0].sum(),
    "TiCoLoss": lambda: fastssl.TiCoLoss()(a, b),
    "MMCRLoss": lambda: fastssl.MMCRLoss()(a.view(8, 2, 8), b.view(8, 2, 8)),
    "FroSSLLoss": lambda: fastssl.FroSSLLoss()([a, b]),
    "EMPSSLLoss": lambda: fastssl.EMPSSLLoss()([a, b]),
    "HypersphereLoss": lambda: fastssl.HypersphereLoss()(a, b),
    "DCLWLoss": lambda: fastssl.DCLWLoss()(a, b),
    "MACLLoss": lambda: fastssl.MACLLoss()(a, b),
    "DirectCLRLoss": lambda: fastssl.DirectCLRLoss(loss_dim=4)(a, b),
    "CO2Regularizer (bank)": lambda: fastssl.CO2Regularizer(memory_bank_size=(32, 8))(a, b),
    "PatchKernelAlignmentLoss": lambda: fastssl.PatchKernelAlignmentLoss()(a.view(2, 8, 8), b.view(2, 8, 8)),
    "linear_distillation_loss": lambda: fastssl.linear_distillation_loss(a, b, b[:5], student_temp=0.1, teacher_temp=0.04),
    "linear_distillation_loss (sinkhorn)": lambda: fastssl.linear_distillation_loss(
        a, b, b[:5], student_temp=0.1, teacher_temp=0.04, centering="sinkhorn"),
    "MaskedLMLoss": lambda: fastssl.MaskedLMLoss(label_smoothing=0.1)(a, b[:5], torch.arange(16) % 5, b[5, :5]),
    "SIGReg": lambda: fastssl.SIGReg()(a),
    "LeJEPALoss": lambda: fastssl.LeJEPALoss()(local_proj=a.view(2, 8, 8), global_proj=b.view(2, 8, 8)),
    "LeWMLoss": lambda: fastssl.LeWMLoss()(predicted=a.view(4, 4, 8)[:, 1:], target=b.view(4, 4, 8)[:, 1:],
                                           embeddings=b.view(4, 4, 8)),
    "VISRegLoss": lambda: fastssl.VISRegLoss()(local_proj=a.view(2, 8, 8), global_proj=b.view(2, 8, 8)),
    "DetConSLoss": lambda: fastssl.DetConSLoss(gather_distributed=False)(
        a.view(4, 4, 8), b.view(4, 4, 8), torch.tensor([[0, 1, 1, 2]] * 4), torch.tensor([[1, 0, 2, 3]] * 4)),
    "VICRegLLoss": lambda: fastssl.VICRegLLoss()([(a, a.view(16, 2, 2, 2)), (b, b.view(16, 2, 2, 2))],
                                                 [a.detach().view(16, 2, 2, 2), b.detach().view(16, 2, 2, 2)]),
    "WMSELoss": lambda: fastssl.WMSELoss(embedding_dim=4, w_size=8)(torch.cat([a, b]).view(-1, 4)),
    "Whitening2d": lambda: fastssl.Whitening2d(8)(a).sum(),
    "DSERegularizer": lambda: fastssl.DSERegularizer()(a.view(2, 8, 8)),
    "CAPILoss": lambda: fastssl.CAPILoss()(a.view(2, 8, 8), b.view(2, 8, 8)[:, :3], torch.tensor([[0, 5, 7]] * 2)),
    "KoLeoLoss (groups)": lambda: fastssl.KoLeoLoss(group_size=4)(a),
    "GramAnchoringLoss": lambda: fastssl.GramAnchoringLoss()(a.view(2, 8, 8), b.view(2, 8, 8)),
    "MSNLoss": lambda: fastssl.MSNLoss()(a, b[:8], b[8:]),
    "PMSNLoss": lambda: fastssl.PMSNLoss()(a, b[:8], b[8:]),
    "PMSNCustomLoss": lambda: fastssl.PMSNCustomLoss(lambda m: torch.ones_like(m) / len(m))(a, b[:8], b[8:]),
    "MAELoss": lambda: fastssl.MAELoss(patch_size=2)(a.view(2, 8, 8), b.view(2, 2, 4, 8), torch.ones(2, 8)),
    "Wav2Vec2ContrastiveLoss": lambda: fastssl.Wav2Vec2ContrastiveLoss(num_negatives=5)(
        a.view(2, 8, 8), b.view(2, 8, 8), codevector_logits=a.view(16, 2, 4)),
    "HuBERTLoss": lambda: fastssl.HuBERTLoss()(a.view(2, 8, 8), torch.arange(16).view(2, 8) % 5, b[:5],
                                               torch.arange(16).view(2, 8) % 2 == 0),
    "IBOTPatchLoss": lambda: fastssl.IBOTPatchLoss(output_dim=8)(a, b, torch.ones(2, 2, 4, dtype=torch.bool)),
    "IBOTPlusPlusPatchLoss": lambda: fastssl.IBOTPlusPlusPatchLoss(output_dim=8)(
        a.view(2, 8, 8), b.view(2, 8, 8), torch.arange(16).view(2, 8) % 3 == 0),
    "DINOLoss (Sinkhorn-Knopp)": lambda: fastssl.DINOLoss(output_dim=8, center_mode="sinkhorn_knopp")([a, b], [a, b]),
    "roi_resample_to_grid": lambda: fastssl.roi_resample_to_grid(
        a.view(2, 1, 8, 8), torch.tensor([[0.5, 1.0, 6.0, 7.5]] * 2), 3, 3).sum(),
}
heavy = ("triton", "torch._dynamo", "torch.utils.cpp_extension")
seen = {}
for name, call in calls.items():
    loss = call()
    if loss.requires_grad:
        loss.backward()
    seen[name] = [m for m in heavy if m in sys.modules]
print(json.dumps(seen))
"""


def test_an_eager_cpu_call_imports_no_compiler(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "FASTSSL_BACKEND")}
    env["FASTSSL_NATIVE_CACHE"] = str(tmp_path)  # nothing built: the native backend must stay out
    out = subprocess.run([sys.executable, "-c", EAGER_PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {name: [] for name in json.loads(out.stdout)}
    assert not any(tmp_path.iterdir()), "a loss call wrote to the native build cache"
