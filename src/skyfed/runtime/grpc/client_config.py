"""The part of the experiment config a client receives when it registers.

A client needs the model, training, compression and federation settings, and the
client list (its index and the partition depend on it). It does not get the server's
paths or another client's private data location. Dropped or reset to their defaults:

- `out_dir`, `workers` (the server's run directory; simulation workers);
- `data.path` when it is a path on the server (the bundled corpus name `wikitext2` is
  kept: every client has it), and `data.valid_path`;
- `tokenizer.path` (the client receives the tokenizer files themselves);
- `federation.spill_dir` (where the server keeps large updates while it checks them);
- every other client's `data:` (the receiving client keeps its own);
- `eval` (the server evaluates), and `clouds` (the simulated clouds) unless the
  partition is `capacity`, which sizes the shards by the clouds' profiles.
"""

from __future__ import annotations

from skyfed.config import ExperimentConfig, dump_config
from skyfed.data.corpus import BUNDLED

PRIVATE_CORPUS = "(kept on the server)"  # data.path a client sees when the server's corpus is a local path


def client_config(cfg: ExperimentConfig, name: str) -> str:
    """The config YAML to send to client `name`."""
    defaults = ExperimentConfig()
    data_update = {"valid_path": None}
    if cfg.data.path != BUNDLED:
        data_update["path"] = PRIVATE_CORPUS
    clients = [c if c.name == name else c.model_copy(update={"data": None}) for c in cfg.federation.clients]
    update = {
        "out_dir": defaults.out_dir,
        "workers": 1,
        "data": cfg.data.model_copy(update=data_update),
        "tokenizer": cfg.tokenizer.model_copy(update={"path": None}),
        "eval": defaults.eval,
        "federation": cfg.federation.model_copy(update={"clients": clients, "spill_dir": None}),
    }
    if cfg.data.partition.method != "capacity":
        update["clouds"] = defaults.clouds
    return dump_config(cfg.model_copy(update=update))

