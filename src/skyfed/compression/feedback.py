"""Error feedback: the sender keeps what compression dropped and adds it to its next input.

Seide et al. 2014 ("1-bit SGD") and Karimireddy et al. 2019 ("Error Feedback Fixes
SignSGD"): with residual ``e``, the sender compresses ``c = x + e`` and keeps
``e' = c - decode(encode(c))``, so nothing is lost, only delayed. The sum of what was
sent and the new residual equals the compensated input exactly: for sparsifiers the
kept values are copies and the dropped ones move whole to the residual; for casts and
nearest-rounding quantizers the subtraction is exact in fp32 (Sterbenz's lemma: the
decoded value lies within a factor of two of the input, or is zero).
"""

from __future__ import annotations

import torch

from skyfed.compression.chain import Chain
from skyfed.compression.wire import spec_of


class ErrorFeedback:
    """Per-sender residual memory for one stream of messages (e.g. one client's uplink)."""

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def compensate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """x + residual (a new dict; the input is not modified)."""
        return {k: (v + self.residual[k] if k in self.residual else v.to(torch.float32)) for k, v in tensors.items()}

    def update(self, compensated: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> None:
        """Remember what the receiver will not see: compensated - sent."""
        self.residual = {k: compensated[k] - sent[k] for k in compensated}

    def encode(self, tensors: dict[str, torch.Tensor], chain: Chain) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Compensate, encode, decode locally and update the residual.

        Returns (encoded parts, decoded tensors as the receiver will see them)."""
        compensated = self.compensate(tensors)
        parts = chain.encode(compensated)
        sent = chain.decode(parts, spec_of(compensated), "error feedback")
        self.update(compensated, sent)
        return parts, sent

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.residual)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = dict(state)
