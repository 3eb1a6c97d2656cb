"""Extended log-barrier (Kervadec et al., "Constrained deep networks: Lagrangian optimization via log-barrier
extensions", 2019): a differentiable, everywhere-finite penalty for an inequality constraint ``z <= 0``."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ExtendedLogBarrier", "extended_log_barrier"]


def extended_log_barrier(z: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Elementwise ``psi_t(z)`` for the constraint ``z <= 0``::

        psi_t(z) = -(1/t) ln(-z)                        if z <= -1/t^2
                   t z - (1/t) ln(1/t^2) + 1/t          otherwise

    The two branches meet with the same value and slope at ``z = -1/t^2``; the linear branch keeps it finite (and
    its gradient ``t``) where the plain log-barrier is undefined.
    """
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    bound = -1.0 / t**2
    inside = z <= bound
    # The log sees only admissible values on both branches, so neither the value nor the gradient turns NaN.
    log_branch = -torch.log(-torch.where(inside, z, bound)) / t
    linear_branch = t * z - torch.log(1.0 / t**2) / t + 1.0 / t
    return torch.where(inside, log_branch, linear_branch)


class ExtendedLogBarrier(nn.Module):
    """Module form of :func:`extended_log_barrier` whose ``t`` is a buffer, saved in checkpoints.

    ``t`` is grown during training (``t = min(5 * 1.01^epoch, 10)`` in the paper; the bundle's schedule sets it).

    Args:
        t: initial ``t`` (> 0); larger is closer to the hard barrier.
    """

    def __init__(self, t: float = 5.0) -> None:
        super().__init__()
        if t <= 0:
            raise ValueError(f"t must be > 0, got {t}.")
        self.register_buffer("t", torch.tensor(float(t)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Elementwise penalty of ``z`` (any shape), computed in float32."""
        return extended_log_barrier(z.float(), self.t)

    def extra_repr(self) -> str:
        return f"t={float(self.t):.4g}"
