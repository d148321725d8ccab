"""Local steps per client: `train.local_steps` for all, set per client, or proportional to
each cloud's compute speed.

- `federation.clients[].local_steps`: that client's steps per task;
- `federation.steps_by_speed: true`: every other client gets
  round(train.local_steps x throughput / fastest throughput) steps, at least 1, with the
  throughputs of the clouds' profiles (`clouds.profiles`, `skyfed.clouds`). Every task
  then takes about the same compute time, so a synchronous round stops waiting for the
  slowest cloud and an asynchronous strategy's updates arrive about equally stale.

Clients that take different numbers of local steps are FedNova's setting (Wang et al.
2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", arXiv:2007.07481); here every strategy weighs an update by the tokens it
trained on, as it always does.

Budgets. A synchronous run is `federation.rounds` rounds of these tasks. An asynchronous
run spends the token budget of the synchronous run with equal steps,
rounds x clients x train.local_steps steps (`step_budget`), whatever each task's size.

Learning-rate schedules. Each client's cosine schedule spans the steps it is expected to
take (`schedule_steps`): rounds x its steps in a synchronous run; in an asynchronous run
with steps by speed, its share of the step budget (tasks take equal time, so every client
finishes about the same number of tasks: budget x its steps / the sum of all clients').
`train.schedule_stretch` then lengthens every schedule (`skyfed.train.lr_at`).
"""

from __future__ import annotations

import math
from typing import Any


def client_steps(cfg: Any, num_params: int) -> dict[str, int]:
    """Each client's local steps per task (see the module docstring); `num_params` sizes
    the FLOPs-based throughput of profiles without `tokens_per_s`."""
    fed, default = cfg.federation, cfg.train.local_steps
    speed: dict[str, float] = {}
    if fed.steps_by_speed:
        from skyfed.clouds import network_from_config

        net = network_from_config(cfg, max(1, num_params))
        speed = {c.name: net.throughput(c.name) for c in fed.clients}
        fastest = max(speed.values())
        speed = {name: s / fastest for name, s in speed.items()}
    out = {}
    for c in fed.clients:
        if c.local_steps is not None:
            out[c.name] = c.local_steps
        elif c.name in speed:
            out[c.name] = max(1, round(default * speed[c.name]))
        else:
            out[c.name] = default
    return out


def step_budget(cfg: Any) -> int:
    """An asynchronous run's local steps in all: those of `federation.rounds` synchronous
    rounds of `train.local_steps` each."""
    return cfg.federation.rounds * len(cfg.federation.clients) * cfg.train.local_steps


def is_asynchronous(cfg: Any) -> bool:
    """Whether the configured strategy runs in the asynchronous loop."""
    from skyfed.federation.strategies import STRATEGIES

    strategy = STRATEGIES.get(cfg.federation.strategy.name)
    return bool(strategy is not None and strategy.asynchronous)


def client_schedules(cfg: Any, num_params: int) -> dict[str, int]:
    """The length of each client's learning-rate schedule, for the configured strategy."""
    return schedule_steps(cfg, client_steps(cfg, num_params), is_asynchronous(cfg))


def schedule_steps(cfg: Any, steps: dict[str, int], asynchronous: bool) -> dict[str, int]:
    """The length of each client's learning-rate schedule, in its own steps."""
    if asynchronous and cfg.federation.steps_by_speed:
        total = sum(steps.values())
        return {name: max(1, math.ceil(step_budget(cfg) * s / total)) for name, s in steps.items()}
    return {name: cfg.federation.rounds * s for name, s in steps.items()}
