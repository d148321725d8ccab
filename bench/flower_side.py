"""The Flower half of bench/vs_flower.py: FedAvg with Flower's simulation engine.

Runs under the benchmark-only Flower venv (never skyfed's runtime environment):

    PYTHONPATH=src /work/flwr-venv/bin/python bench/flower_side.py SPEC.json

SPEC.json (written by vs_flower.py) names the client token arrays (.npy, the same split
skyfed uses), the validation tokens, the model preset and the training settings. The
clients use skyfed's own model builder, `LocalTrainer` (AdamW, clipping, warmup +
cosine) and window sampling with the same seeds as skyfed's clients, so the two runs
differ only in the framework that moves the parameters. Writes RESULT.json with the
final evaluation, bytes per client per round, per-round timings and the local
training seconds measured inside the client function (as skyfed measures them).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T_IMPORT = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from skyfed.config import TrainConfig  # noqa: E402
from skyfed.model import build_model, federated_parameter_names, get_params, set_params  # noqa: E402
from skyfed.train import LocalTrainer, evaluate  # noqa: E402

SPEC = json.loads(Path(sys.argv[1]).read_text())
CPU = torch.device("cpu")


def new_model() -> torch.nn.Module:
    m = SPEC["model"]
    return build_model(m["preset"], m["vocab_size"], m["eos_token_id"], m["overrides"], None, SPEC["seed"])


def wire_size(record: ArrayRecord) -> int:
    """Bytes of the record's serialized object tree (record, arrays, array chunks)."""
    total = len(record.deflate())
    for arr in record.values():
        total += len(arr.deflate()) + sum(len(chunk.deflate()) for chunk in arr.children.values())
    return total


# ------------------------------------------------------------------ client

_CLIENT: dict = {}  # per worker process: the model and trainer (rebuilt state is reset each round)


def _client_state(pid: int):
    if "trainer" not in _CLIENT:
        torch.set_num_threads(SPEC["threads"])
        model = new_model()
        total = SPEC["rounds"] * SPEC["local_steps"]
        _CLIENT["trainer"] = LocalTrainer(model, TrainConfig(**SPEC["train"]), CPU, total)
        _CLIENT["names"] = federated_parameter_names(model)
    if pid not in _CLIENT:
        _CLIENT[pid] = np.load(SPEC["client_tokens"][pid], mmap_mode="r")
    return _CLIENT["trainer"], _CLIENT["names"], _CLIENT[pid]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])  # 1-based
    trainer, names, tokens = _client_state(pid)
    params = msg.content["arrays"].to_torch_state_dict()
    set_params(trainer.model, params)
    trainer.step = (rnd - 1) * SPEC["local_steps"]  # the same point of the lr schedule as skyfed
    # the same seeds as skyfed's FederatedClient.handle for client `pid` in round rnd-1
    rng = np.random.default_rng([SPEC["seed"] * 1000 + pid, rnd - 1])
    torch.manual_seed(int(rng.integers(2**31)))
    stats = trainer.train(tokens, SPEC["local_steps"], rng)
    arrays = ArrayRecord.from_torch_state_dict(get_params(trainer.model, names))
    metrics = MetricRecord({"num-examples": stats.tokens, "train-seconds": stats.seconds, "train-loss": stats.loss_mean})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


# ------------------------------------------------------------------ server

RESULT: dict = {"rounds": [], "train_seconds": [], "bytes_up": None}
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(SPEC["threads"])
    model = new_model()
    names = federated_parameter_names(model)
    valid = np.load(SPEC["valid_tokens"], mmap_mode="r")
    ev_cfg = SPEC["eval"]
    initial = ArrayRecord.from_torch_state_dict(get_params(model, names))
    RESULT["bytes_down"] = wire_size(initial)
    RESULT["count_bytes_down"] = initial.count_bytes()
    marks = {"last": None}

    def on_train_metrics(records: list[RecordDict], key: str) -> MetricRecord:
        RESULT["train_seconds"].append([float(r["metrics"]["train-seconds"]) for r in records])
        if RESULT["bytes_up"] is None:
            RESULT["bytes_up"] = wire_size(records[0]["arrays"])
            RESULT["count_bytes_up"] = records[0]["arrays"].count_bytes()
        return aggregate_metricrecords(records, key)

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        now = time.perf_counter()
        if rnd == 0:  # called once before round 1: start the round clock, no evaluation (skyfed has none)
            marks["last"] = now
            return None
        set_params(model, arrays.to_torch_state_dict())
        ev = evaluate(model, valid, ev_cfg["seq_len"], ev_cfg["batch_size"], CPU, ev_cfg["max_batches"])
        done = time.perf_counter()
        RESULT["rounds"].append({"round": rnd, "wall_s": done - marks["last"], "eval_s": done - now,
                                 "val_ppl": ev.ppl, "val_token_acc": ev.token_acc})
        marks["last"] = done
        return MetricRecord({"val_ppl": ev.ppl, "val_token_acc": ev.token_acc})

    n = SPEC["clients"]
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n,
                      train_metrics_aggr_fn=on_train_metrics)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=SPEC["rounds"], evaluate_fn=evaluate_fn)
    set_params(model, result.arrays.to_torch_state_dict())
    t0 = time.perf_counter()
    final = evaluate(model, valid, ev_cfg["seq_len"], ev_cfg["batch_size"], CPU, ev_cfg["final_max_batches"])
    RESULT["final_eval_s"] = time.perf_counter() - t0
    RESULT["final"] = {"val_loss": final.loss, "val_ppl": final.ppl, "val_token_acc": final.token_acc, "tokens": final.tokens}


if __name__ == "__main__":
    started = time.perf_counter()
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=SPEC["clients"],
        backend_config={"client_resources": {"num_cpus": SPEC["threads"], "num_gpus": 0.0}},
    )
    RESULT["import_s"] = started - T_IMPORT
    RESULT["run_simulation_s"] = time.perf_counter() - started
    Path(SPEC["result"]).write_text(json.dumps(RESULT, indent=2) + "\n")
