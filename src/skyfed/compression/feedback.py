"""Error feedback: the sender keeps what compression dropped and adds it to its next input.

Seide et al. 2014 ("1-bit SGD") and Karimireddy et al. 2019 ("Error Feedback Fixes
SignSGD"): with residual ``e``, the sender compresses ``c = x + e`` and keeps
``e' = c - decode(encode(c))``, so nothing is lost, only delayed. The sum of what was
sent and the new residual equals the compensated input exactly: for sparsifiers the
kept values are copies and the dropped ones move whole to the residual; for casts and
nearest-rounding quantizers the subtraction is exact in fp32 (Sterbenz's lemma: the
decoded value lies within a factor of two of the input, or is zero).

With ``in_model`` (``compression.residual_in_model``) the residual also stays in the
sender's model: the client trains from the global model plus the progress it has not
sent yet (``params - residual``, updates being ``start - end``), so its next update
already contains the residual and is sent without adding it again. Classic error
feedback instead restarts from the global model, so local training re-learns part of
what is still waiting in the residual, and that part then travels twice. CSER (Xie et
al. 2020, "error reset") likewise keeps local models that differ by their residuals; it
also resets them periodically, which skyfed does not.
"""

from __future__ import annotations

import torch

from skyfed.compression.chain import SEP, Chain
from skyfed.compression.wire import spec_of


class ErrorFeedback:
    """Per-sender residual memory for one stream of messages (e.g. one client's uplink)."""

    def __init__(self, in_model: bool = False) -> None:
        self.residual: dict[str, torch.Tensor] = {}
        self.in_model = in_model

    def start_point(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model a client trains from: the global `params`, minus the unsent residual
        when the residual lives in the model (updates are ``start - end``)."""
        if not self.in_model or not self.residual:
            return params
        return {k: (v - self.residual[k] if k in self.residual else v) for k, v in params.items()}

    def compensate(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """x + residual (a new dict; the input is not modified)."""
        return {k: (v + self.residual[k] if k in self.residual else v.to(torch.float32)) for k, v in tensors.items()}

    def update(self, compensated: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> None:
        """Remember what the receiver will not see: compensated - sent."""
        self.residual = {k: compensated[k] - sent[k] for k in compensated}

    def encode(
        self, tensors: dict[str, torch.Tensor], chain: Chain, compensate: bool = True, consume: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Compensate (unless the residual is already inside `tensors`), encode, decode
        locally and update the residual.

        Returns (encoded parts, decoded tensors as the receiver will see them). With
        `consume` the caller hands `tensors` over: the residual is added to them in place,
        the old residual is let go once the parts exist, the dict is emptied while the new
        residual is computed tensor by tensor, and the decoded tensors are not returned
        (None): one update-sized dict is alive at a time besides the new residual, instead
        of four. The numbers are the same."""
        if consume:
            compensated = self._compensate_in_place(tensors) if compensate else tensors
            for k, v in compensated.items():
                if v.dtype != torch.float32:
                    compensated[k] = v.to(torch.float32)
        else:
            compensated = self.compensate(tensors) if compensate else {k: v.to(torch.float32) for k, v in tensors.items()}
        spec = spec_of(compensated)
        parts = chain.encode(compensated)
        if not consume:
            sent = chain.decode(parts, spec, "error feedback")
            self.update(compensated, sent)
            return parts, sent
        self.residual = {}  # already inside `compensated`
        by_key: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in parts.items():
            by_key.setdefault(name.rpartition(SEP)[0], {})[name] = t
        for k in list(compensated):  # decoded one tensor at a time, as the receiver would
            sent = chain.decode(by_key.get(k, {}), {k: spec[k]}, "error feedback")[k]
            self.residual[k] = compensated.pop(k) - sent
        return parts, None

    def _compensate_in_place(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """x + residual, written into `tensors` where x is an fp32 tensor of the residual's shape."""
        for k, r in self.residual.items():
            v = tensors.get(k)
            if v is None:
                continue
            if v.dtype == torch.float32 and v.shape == r.shape and not v.requires_grad:
                v.add_(r)
            else:
                tensors[k] = v + r
        return tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.residual)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = dict(state)
