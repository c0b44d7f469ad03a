"""The ``fastssl`` op namespace: every op is defined here, with its fake and autograd, once.

Ops are defined with ``torch.library.Library`` (schema + a ``CompositeExplicitAutograd``
kernel), ``register_fake`` and ``register_autograd``, not with ``torch.library.custom_op``: a
custom op's first eager call imports ``torch._dynamo`` (and with it Triton, Inductor and sympy,
~170 MB and >1 s), which an eager CPU loss must not pay. These ops still trace under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# Held for the life of the process: dropping a Library object drops its registrations.
_LIBRARY = torch.library.Library("fastssl", "FRAGMENT")


def define(name: str, schema: str, impl: Callable, fake: Optional[Callable] = None) -> torch._ops.OpOverload:
    """Define ``fastssl::<name><schema>`` running ``impl`` on every device; returns the op."""
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    op = getattr(torch.ops.fastssl, name).default
    if fake is not None:
        torch.library.register_fake(op)(fake)
    return op


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd`` for an op defined here or by the native extension."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """The placeholder an op returns for a gradient nobody asked for (schemas return Tensors)."""
    return like.new_empty(0)
