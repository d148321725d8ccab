"""Heterogeneous LoRA ranks per client: zero-padding and truncation (HetLoRA).

Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP, arXiv:2401.06432. A slower cloud trains a smaller rank
(`federation.clients[i].lora_r`, at most `model.peft.r`, the server's rank):

* downlink: the client receives the global adapter truncated to its rank,
  A[:r_i] (r_i x in) and B[:, :r_i] (out x r_i), so its bytes shrink with its rank;
* uplink: it sends its rank-r_i update; the server zero-pads the client's factors to
  the full rank before the strategy sees them. In skyfed's delta convention
  (delta = global - client model) a zero-padded model has delta = global in the padded
  rows of A and columns of B, so FedAvg averages the zero-padded client modules exactly
  as HetLoRA does (with token weights; HetLoRA's sparsity weighting and local rank
  self-pruning are not implemented).

Every rank uses the server's scaling alpha / r (a rank-r_i client gets
lora_alpha = alpha * r_i / r), so a truncated adapter is exactly the leading components
of the global update, and zero-padding leaves each client's B_i A_i unchanged. A
client's initial adapter is the truncation of the server's (built at rank r from the
same seed, then cut), so round 0 needs no extra download. Zero-padding was chosen over
FlexLoRA's SVD redistribution (Bai et al. 2024, arXiv:2402.11505) because it keeps the
factors the clients trained and needs no dense product on the server.
"""

from __future__ import annotations

from typing import Any

import torch

from skyfed.compression.wire import TensorSpec

Params = dict[str, torch.Tensor]


def client_rank(cfg: Any, name: str) -> int | None:
    """The LoRA rank `name` trains when it is below the server's, else None."""
    peft = cfg.model.peft
    if peft is None:
        return None
    spec = next((c for c in cfg.federation.clients if c.name == name), None)
    rank = spec.lora_r if spec is not None else None
    return rank if rank is not None and rank < peft.r else None


def client_ranks(cfg: Any) -> dict[str, int]:
    """Clients that train below the server's rank, with their rank."""
    ranks = {c.name: client_rank(cfg, c.name) for c in cfg.federation.clients}
    return {n: r for n, r in ranks.items() if r is not None}


def is_a(name: str) -> bool:
    return ".lora_A." in name


def is_b(name: str) -> bool:
    return ".lora_B." in name


def truncate(params: Params, rank: int) -> Params:
    """The leading `rank` components: A[:rank], B[:, :rank]; other tensors unchanged."""
    out = {}
    for n, t in params.items():
        out[n] = t[:rank] if is_a(n) else t[:, :rank] if is_b(n) else t
    return out


def truncated_spec(spec: dict[str, TensorSpec], rank: int) -> dict[str, TensorSpec]:
    out = {}
    for n, s in spec.items():
        shape = (rank, *s.shape[1:]) if is_a(n) else (s.shape[0], rank) if is_b(n) else s.shape
        out[n] = TensorSpec(tuple(shape), s.dtype)
    return out


def pad_delta(delta: Params, global_params: Params, rank: int) -> Params:
    """A rank-`rank` update as the update of the client's zero-padded factors:
    delta = global - [model; 0], i.e. the global model's own values in the padded part."""
    out = {}
    for n, d in delta.items():
        g = global_params[n]
        if is_a(n):
            out[n] = torch.cat([d, g[rank:]], dim=0)
        elif is_b(n):
            out[n] = torch.cat([d, g[:, rank:]], dim=1)
        else:
            out[n] = d
    return out


def shrink_adapter(model: torch.nn.Module, section: Any, rank: int, lora_config) -> torch.nn.Module:
    """`model` (a PEFT model at rank `section.r`, freshly initialised) re-wrapped at `rank`
    with the leading components of its initial adapter and the server's scaling."""
    from peft import get_peft_model

    from skyfed.model import federated_parameter_names, get_params, set_params

    names = federated_parameter_names(model)
    initial = truncate(get_params(model, names), rank)
    base = model.unload()  # the base model, LoRA layers removed (not merged)
    cfg = lora_config(section, base)
    cfg.r, cfg.lora_alpha = rank, section.alpha * rank / section.r  # scaling alpha / r at every rank
    wrapped = get_peft_model(base, cfg)
    set_params(wrapped, initial)
    return wrapped
