"""DINO's projection head, as lightly's ``DINOProjectionHead``, with the two halves the fused
losses take: :meth:`DINOProjectionHead.features` (the L2-normalised bottleneck) and
:attr:`DINOProjectionHead.last_layer_weight` (the weight-normalised (K, bottleneck) last layer), so
``dino(teacher, head.features(x), center, last_layer_weight=head.last_layer_weight)`` never holds
the student's (B, K) outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class DINOProjectionHead(nn.Module):
    """lightly's ``DINOProjectionHead``: three linear layers (GELU between them, batch norm after
    the first two with ``batch_norm``) to a ``bottleneck_dim`` output, L2-normalised, then a
    weight-normalised linear layer to ``output_dim`` (its norms fixed at 1 with
    ``norm_last_layer``). Same modules, state_dict keys (``layers.*``, ``last_layer.weight_g``,
    ``last_layer.weight_v``), initialisation and draws from the global RNG as lightly's.

    (B, input_dim) → (B, output_dim). ``forward(x)`` equals
    ``features(x) @ last_layer_weight.T``; the fused losses take the two halves instead.

    Example::

        >>> head = DINOProjectionHead(384, 2048, 256, 65536)
        >>> loss = fastssl.dino(teacher_out, [head.features(x) for x in crops], center,
        ...                     last_layer_weight=head.last_layer_weight)
    """

    def __init__(self, input_dim: int = 2048, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 output_dim: int = 65536, batch_norm: bool = False, freeze_last_layer: int = -1,
                 norm_last_layer: bool = True):
        super().__init__()
        layers = []
        for d_in, d_out, last in ((input_dim, hidden_dim, False), (hidden_dim, hidden_dim, False),
                                  (hidden_dim, bottleneck_dim, True)):
            layers.append(nn.Linear(d_in, d_out, bias=last or not batch_norm))  # a batch norm follows: no bias
            if not last:
                layers += [nn.BatchNorm1d(d_out)] if batch_norm else []
                layers.append(nn.GELU())
        self.layers = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.freeze_last_layer = freeze_last_layer
        # lightly's (deprecated) weight_norm hook: its weight_g / weight_v state_dict keys
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, output_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """lightly's: linear weights from N(0, 0.02²) truncated to [−2, 2], biases 0."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02, a=-2.0, b=2.0)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)

    def features(self, x: Tensor) -> Tensor:
        """The last layer's (B, bottleneck_dim) inputs: the MLP's outputs, L2-normalised."""
        return F.normalize(self.layers(x), dim=-1, p=2)

    @property
    def last_layer_weight(self) -> Tensor:
        """The (output_dim, bottleneck_dim) weight g · v / ‖v‖ (row-wise) the last layer applies,
        differentiable in weight_g and weight_v: what weight_norm's forward hook computes."""
        return torch._weight_norm(self.last_layer.weight_v, self.last_layer.weight_g, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.features(x))

    def cancel_last_layer_gradients(self, current_epoch: int) -> None:
        """lightly's: drop the last layer's gradients during the first ``freeze_last_layer`` epochs."""
        if current_epoch >= self.freeze_last_layer:
            return
        for param in self.last_layer.parameters():
            param.grad = None
