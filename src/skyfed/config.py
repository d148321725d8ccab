"""Experiment configuration: a pydantic schema, named presets, YAML files and --set overrides.

Every section is strict (an unknown key is an error that names it). Presets are plain
functions returning a whole experiment config as a dict (as in torchtitan's config
registry); `load_config` merges preset, YAML file and `key.path=value` overrides, in
that order, and validates once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from skyfed.errors import ConfigError, SkyfedError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PartitionConfig(Section):
    """How one corpus is split across clients (ignored for clients with their own data)."""

    method: Literal["iid", "natural", "dirichlet", "quantity", "capacity"] = "iid"
    seed: int | None = None  # defaults to the experiment seed
    alpha: float = Field(0.5, gt=0)  # dirichlet: concentration of each client's topic mix
    num_topics: int = Field(8, ge=1)  # dirichlet (and the report): k-means topics of documents
    shares: list[float] | None = None  # quantity: explicit relative sizes, one per client
    power: float = Field(1.0, ge=0)  # quantity without shares: client i gets (i + 1) ** -power

    @model_validator(mode="after")
    def _positive_shares(self) -> "PartitionConfig":
        if self.shares is not None and (not self.shares or min(self.shares) <= 0):
            raise ValueError(f"shares must be positive numbers, got {self.shares}")
        return self


class DataConfig(Section):
    # "wikitext2" = the bundled copy; or a file, a folder (.txt, .jsonl, .parquet), a .jsonl or
    # .parquet file, or a folder written by datasets' save_to_disk (skyfed.data.records)
    path: str = "wikitext2"
    format: Literal["auto", "wikitext", "txt", "jsonl", "parquet", "datasets"] = "auto"
    text_column: str = Field("text", min_length=1)  # of JSONL records, Parquet and datasets tables
    valid_path: str | None = None  # defaults to the corpus' own valid split, else carved
    valid_fraction: float = Field(0.05, gt=0, lt=1)
    max_train_tokens: int | None = Field(None, gt=0)  # truncate (smoke runs)
    max_valid_tokens: int | None = Field(None, gt=0)
    # Keep only the documents (train and valid) of these k-means topics, 0..partition.num_topics-1,
    # labelled with data.partition.num_topics and seed (skyfed.data.topics.select_topics).
    topics: list[int] | None = None
    partition: PartitionConfig = PartitionConfig()


class TokenizerConfig(Section):
    path: str | None = None  # a local Hugging Face tokenizer directory; else train BPE
    vocab_size: int = Field(4096, ge=260, le=65535 * 4)
    min_frequency: int = Field(2, ge=1)


class PeftSection(Section):
    """Fine-tune a LoRA adapter (Hu et al. 2021, arXiv:2106.09685) with `peft` instead of
    every weight: only the adapter's tensors are trained, sent and aggregated."""

    method: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: peft's default for the architecture
    # factors: FedAvg of A and B separately (mean(B) mean(A), not mean(B A)); exact: FedEx-LoRA
    # (Singhal et al. 2024) folds the difference into the base weights (skyfed.lora_exact)
    aggregation: Literal["factors", "exact"] = "factors"


class ModelConfig(Section):
    preset: str = "gpt2-tiny"
    # A local pretrained HF model directory (overrides preset), or a hub-cache folder
    # (models--org--name or one of its snapshots/<hash>); brings its own tokenizer.
    path: str | None = None
    overrides: dict[str, Any] = {}  # fields of the transformers config
    dtype: Literal["float32", "bfloat16"] = "float32"  # of the model's weights
    peft: PeftSection | None = None  # e.g. {method: lora, r: 8}


class TrainConfig(Section):
    local_steps: int = Field(40, ge=1)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    # the cosine's length as a multiple of the steps a schedule covers (a client's expected
    # steps, a baseline's, FedSGD's rounds): 2 = training ends halfway down the decay
    schedule_stretch: float = Field(1.0, ge=1.0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    optimizer_state: Literal["keep", "reset"] = "keep"  # AdamW state across rounds
    # Speed of local training (docs/speed.md). AdamW kernel: auto = fused where torch has it
    # for the device and dtype, else foreach (skyfed.optim); the update is the same up to rounding.
    optimizer_impl: Literal["auto", "fused", "foreach", "plain"] = "auto"
    # torch.compile of the training loss; auto = on for CUDA, off on CPU (skyfed.compiled_loss)
    compile: Literal["auto", "on", "off"] = "auto"
    # mixed precision of the training forward; auto = bf16 on CUDA with bf16 support, else off
    autocast: Literal["auto", "bf16", "off"] = "auto"
    # Recompute each layer's activations in the backward pass instead of keeping them
    # (Hugging Face's gradient_checkpointing_enable): less memory, about a third more compute.
    activation_checkpointing: bool = False


class EvalConfig(Section):
    """Validation of the global model (skyfed.eval_plan): every `interval` rounds and
    after the last round, on at most `max_batches` batches and at most `max_tokens`
    predicted tokens (both caps apply; None = no cap), then once more after the run on
    `final_max_batches` batches (None = the whole split)."""

    batch_size: int = Field(16, ge=1)
    max_batches: int | None = Field(16, ge=1)  # per evaluated round; None = no batch cap
    max_tokens: int | None = Field(None, ge=1)  # per evaluated round: windows of seq_len predicted tokens
    interval: int = Field(1, ge=1)  # evaluate rounds interval-1, 2*interval-1, ... and always the last
    final_max_batches: int | None = Field(None, ge=1)  # after the last round; None = the whole split


class DegradeSpec(Section):
    """Make one client's training text worse on purpose, to study clouds of unequal data
    quality (skyfed.data.degrade); validation stays clean. shuffle: `fraction` of the
    token positions are permuted among themselves; duplicate: only the first
    1 - fraction of the shard is kept, repeated to the shard's length; noise: `fraction`
    of the positions get uniformly random token ids."""

    kind: Literal["shuffle", "duplicate", "noise"]
    fraction: float = Field(1.0, ge=0, le=1)
    seed: int | None = None  # defaults to the experiment seed (and the client's index)


class ClientSpec(Section):
    name: str
    cloud: str | None = None  # the cloud profile; defaults to the name
    data: str | None = None  # the client's own corpus (deployment); else a partition
    # LoRA: this client's adapter rank, at most model.peft.r (HetLoRA, skyfed.lora_ranks); None = model.peft.r
    lora_r: int | None = Field(None, ge=1)
    degrade: DegradeSpec | None = None  # e.g. {kind: shuffle, fraction: 1.0}: this client's training text, degraded
    # this client's local steps per task; None = train.local_steps (or by speed, federation.steps_by_speed)
    local_steps: int | None = Field(None, ge=1)


class StrategyConfig(Section):
    name: str = "fedavg"
    params: dict[str, Any] = {}
    # scale each update's delta down to global L2 norm <= norm_bound before the strategy
    # sees it (any strategy; federation/strategies/robust/norm_bound.py)
    norm_bound: float | None = Field(None, gt=0)


class FederationConfig(Section):
    rounds: int = Field(10, ge=1)
    clients: list[ClientSpec] = [ClientSpec(name="aws"), ClientSpec(name="gcp"), ClientSpec(name="azure")]
    # Many logical clients without listing them: N clients named client0000, client0001, ...
    # whose clouds go round-robin over the clouds of `clients` (aws, gcp, azure by default).
    num_clients: int | None = Field(None, ge=1)
    fraction: float = Field(1.0, gt=0, le=1)
    min_clients: int = Field(1, ge=1)
    # local steps proportional to each cloud's throughput (the fastest takes train.local_steps):
    # tasks take equal compute time (skyfed.federation.steps)
    steps_by_speed: bool = False
    strategy: StrategyConfig = StrategyConfig()
    max_update_bytes: int = Field(8 * 2**30, ge=1)
    round_timeout_s: float | None = Field(None, gt=0)  # deadline for a round's updates
    # gRPC server: an update of at least spill_min_bytes waits in a temporary file in
    # spill_dir (default: $TMPDIR) until it is checked and folded, when the strategy folds
    # updates one at a time (MeanStrategy); null: always in memory
    spill_min_bytes: int | None = Field(64 * 2**20, ge=0)
    spill_dir: str | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> "FederationConfig":
        if self.num_clients is not None and not (
            len(self.clients) == self.num_clients and self.clients == generated_clients(self.clients, self.num_clients)
        ):
            object.__setattr__(self, "clients", generated_clients(self.clients, self.num_clients))
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ValueError(f"client names must be unique, got {names}")
        if not names:
            raise ValueError("at least one client is needed")
        return self


def generated_clients(templates: list[ClientSpec], n: int) -> list[ClientSpec]:
    """`n` clients named client0000..., client i in the cloud of templates[i % len(templates)]."""
    width = max(4, len(str(n - 1)))
    clouds = [t.cloud or t.name for t in templates] or ["aws"]
    ranks = [t.lora_r for t in templates] or [None]
    return [ClientSpec(name=f"client{i:0{width}d}", cloud=clouds[i % len(clouds)], lora_r=ranks[i % len(ranks)])
            for i in range(n)]


class CloudProfileSpec(Section):
    """A user-defined cloud profile, or overrides of a built-in one (see skyfed.clouds)."""

    base: str | None = None  # built-in profile to start from (default: the one of the same name)
    speed: float | None = Field(None, gt=0)
    tokens_per_s: float | None = Field(None, gt=0)
    uplink_mbps: float | None = Field(None, gt=0)
    downlink_mbps: float | None = Field(None, gt=0)
    rtt_ms: float | None = Field(None, ge=0)
    egress_usd_per_gb: float | None = Field(None, ge=0)
    unavailability: float | None = Field(None, ge=0, le=1)


class OutageSpec(Section):
    target: str  # a client or a cloud
    rounds: int | tuple[int, int]  # FIRST or [FIRST, LAST], inclusive, 0-based as in metrics.jsonl


class CloudsConfig(Section):
    """Simulated clouds: the clock, the network and the egress bill (docs/clouds.md)."""

    simulate: bool = True  # False: no clock, no bill (results in send order, zero time)
    server: str = "aws"  # the server's cloud: pays the egress of the model sent to clients
    profiles: dict[str, CloudProfileSpec] = {}
    reference_tflops: float = Field(100.0, gt=0)  # effective FLOP/s of a speed-1.0 cloud (assumption)
    reference_tokens_per_s: float | None = Field(None, gt=0)  # overrides reference_tflops
    same_cloud_free: bool = True  # a client in the server's cloud pays no egress (same region)
    aggregation_s: float | None = Field(None, ge=0)  # simulated aggregation time; None = measured
    outages: list[str | OutageSpec] = []  # "gcp:5-7" or {target: gcp, rounds: [5, 7]}


class CompressionConfig(Section):
    """Codec chains per direction, e.g. ``uplink: [{name: topk, fraction: 0.01}, int8]``
    (see skyfed.compression.codecs); an empty chain sends plain fp32."""

    uplink: list[str | dict[str, Any]] = []
    downlink: list[str | dict[str, Any]] = []
    error_feedback: bool = True  # uplink residuals for lossy chains
    # the client trains from the global model minus its unsent residual: much better with
    # low rank, worse with top-k (docs/compression.md)
    residual_in_model: bool = False
    downlink_delta: bool = True  # send the change since the model a client holds

    @field_validator("uplink", "downlink", mode="after")
    @classmethod
    def _valid_chain(cls, specs: list[Any]) -> list[dict[str, Any]]:
        from skyfed.compression.codecs import build_chain_codecs  # torch-free: checking a config loads no torch

        try:
            return [c.spec() for c in build_chain_codecs(specs)]
        except SkyfedError as exc:
            raise ValueError(str(exc)) from None


class TrackingConfig(Section):
    """Where `logging: [mlflow]` writes (skyfed.tracking); TensorBoard always writes RUN_DIR/tensorboard/."""

    tracking_uri: str | None = None  # MLflow tracking URI; None = sqlite:///RUN_DIR/mlflow.db
    experiment: str | None = None  # MLflow experiment name; None = the config's `name`


class SecAggConfig(Section):
    """Secure aggregation's settings (docs/security.md); used when
    `security.secure_aggregation` is true."""

    ring_bits: Literal[16, 32] = 32  # the ring Z_{2^bits}: 16 halves the uplink bytes of fp32
    threshold: int | None = Field(None, ge=2)  # shares needed to rebuild a secret; None = a majority
    neighbours: int | None = Field(None, ge=2)  # SecAgg+: even number of peers per client; None = all
    clip: Literal["l2", "l2_per_tensor", "coordinate"] = "coordinate"
    bound: float = Field(0.1, gt=0)  # the clip bound: L2 norm, or the range [-bound, bound]
    rounding: Literal["deterministic", "stochastic"] = "deterministic"

    @field_validator("neighbours")
    @classmethod
    def _even(cls, k: int | None) -> int | None:
        if k is not None and k % 2:
            raise ValueError(f"must be even (a Harary graph of k/2 peers on each side), got {k}")
        return k


class DocumentDPConfig(Section):
    """DP-SGD inside each cloud (opacus): the unit of privacy is one training window of
    `train.seq_len + 1` tokens, or one document with `unit: document` (docs/security.md)."""

    noise_multiplier: float = Field(gt=0)  # sigma of the per-step Gaussian noise, times max_grad_norm
    max_grad_norm: float = Field(1.0, gt=0)  # per-window L2 bound of the gradient
    delta: float | None = Field(None, gt=0, lt=1)  # defaults to security.dp.delta
    grad_sample_mode: Literal["hooks", "functorch"] = "hooks"  # opacus' per-sample gradient engine
    # window: a sample is one disjoint window of seq_len + 1 tokens (a document of k windows
    # gets group privacy k); document: a sample is one document (ended by EOS), which
    # contributes one random window of itself when sampled
    unit: Literal["window", "document"] = "window"


class DPConfig(Section):
    """Differential privacy (docs/security.md). Client-level DP-FedAvg (McMahan et al. 2018)
    is on when `clip` and `noise_multiplier` are set; document-level DP-SGD when `document` is."""

    clip: float | None = Field(None, gt=0)  # C: L2 bound of each client's update
    noise_multiplier: float | None = Field(None, gt=0)  # sigma: noise std on the sum is sigma * C
    delta: float = Field(1e-5, gt=0, lt=1)
    noise: Literal["server", "distributed"] = "server"  # who adds the noise to the sum
    accountant: Literal["rdp", "pld"] = "rdp"  # dp-accounting's RDP or PLD accountant
    document: DocumentDPConfig | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> "DPConfig":
        if (self.clip is None) != (self.noise_multiplier is None):
            raise ValueError("clip and noise_multiplier go together: set both for client-level DP, or neither")
        return self

    @property
    def client_level(self) -> bool:
        return self.clip is not None


class SecurityConfig(Section):
    """Privacy layers: secure aggregation and differential privacy (docs/security.md)."""

    secure_aggregation: bool = False
    secagg: SecAggConfig = SecAggConfig()
    dp: DPConfig = DPConfig()


ATTACK_KINDS = ("sign_flip", "scale", "noise", "alie", "junk_data")
# What `factor` means when it is not given (docs/security.md): sign_flip sends -k * delta,
# scale k * delta, noise Gaussian noise of k times the update's norm, alie z (None: from
# n and f as in Baruch et al. 2019); junk_data does not use it.
ATTACK_DEFAULT_FACTOR = {"sign_flip": 4.0, "scale": 100.0, "noise": 10.0, "alie": None, "junk_data": None}


class AttackConfig(Section):
    """SIMULATION ONLY: make the chosen clients misbehave, to evaluate defences
    (skyfed.runtime.attack, docs/security.md). `skyfed server` and `skyfed client` refuse a
    config whose attack section names any client."""

    clients: list[str] = []
    kind: Literal["sign_flip", "scale", "noise", "alie", "junk_data"] = "sign_flip"
    factor: float | None = Field(None, gt=0)
    seed: int | None = None  # noise and junk data; defaults to the experiment seed

    @property
    def active(self) -> bool:
        return bool(self.clients)

    def resolved_factor(self) -> float | None:
        return self.factor if self.factor is not None else ATTACK_DEFAULT_FACTOR[self.kind]


class RayConfig(Section):
    """The Ray runtime (`runtime: ray`, skyfed.runtime.ray; docs/scale.md): a pool of
    actors, each with one model replica, training the sampled clients in turn."""

    address: str | None = None  # None: start Ray on this machine; "auto" or "ray://HOST:PORT": join a cluster
    actors: int = Field(2, ge=1)  # how many clients train at once
    num_cpus_per_actor: float = Field(1.0, gt=0)
    # where each client's state (optimizer moments, residual, held model) waits between
    # its rounds: Ray's object store, or files under RUN_DIR/clients/
    client_state: Literal["object_store", "disk"] = "object_store"
    num_cpus: int | None = Field(None, ge=1)  # a local Ray's CPUs; None = Ray's default (all)
    object_store_mb: int | None = Field(None, ge=75)  # a local Ray's object store; None = Ray's default
    # Keep the actors between the runs of one Python process (a notebook, a script running
    # several experiments): the next run on the same Ray rebuilds its replica in them
    # instead of starting new worker processes. Only where Ray outlives the run (started
    # before it, or a cluster): a Ray that skyfed starts is shut down at the run's end.
    keep_actors: bool = False


class SimulationConfig(Section):
    """The in-process simulation (`runtime: inprocess`, skyfed.runtime.simulation; docs/scale.md)."""

    # Where each client's state waits between its rounds (AdamW moments, error-feedback
    # residual, the model it holds for delta downlinks). disk: safetensors files under
    # RUN_DIR/clients/, and one model replica that the clients share, one client training
    # at a time: memory grows with the model, not with the number of clients. memory:
    # every client keeps its own model and state resident. Both give the same results.
    client_state: Literal["disk", "memory"] = "disk"


class ExperimentConfig(Section):
    name: str = "default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None = torch's default
    # Where the simulated clients train: objects in this process, or a pool of Ray actors
    # (`ray:` below; docs/scale.md).
    runtime: Literal["inprocess", "ray"] = "inprocess"
    simulation: SimulationConfig = SimulationConfig()
    ray: RayConfig = RayConfig()
    out_dir: str = "runs"
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    federation: FederationConfig = FederationConfig()
    clouds: CloudsConfig = CloudsConfig()
    compression: CompressionConfig = CompressionConfig()
    # Experiment trackers that receive every round's metrics and the config (skyfed.tracking);
    # metrics.jsonl and summary.json are always written.
    logging: list[Literal["tensorboard", "mlflow"]] = []
    tracking: TrackingConfig = TrackingConfig()
    security: SecurityConfig = SecurityConfig()
    attack: AttackConfig = AttackConfig()  # simulation only

    @model_validator(mode="before")
    @classmethod
    def _no_workers(cls, data: Any) -> Any:
        if isinstance(data, dict) and "workers" in data:
            raise ValueError(
                "`workers` was removed: train the clients in parallel with `runtime: ray` and "
                "`ray.actors: N` (docs/scale.md)"
            )
        return data

    @model_validator(mode="after")
    def _secagg_composes(self) -> "ExperimentConfig":
        if self.security.secure_aggregation:
            from skyfed.security.secagg.compat import check_config

            try:
                check_config(self)
            except SkyfedError as exc:
                raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _attack_names_clients(self) -> "ExperimentConfig":
        names = [c.name for c in self.federation.clients]
        unknown = [c for c in self.attack.clients if c not in names]
        if unknown:
            raise ValueError(f"attack.clients: {unknown} are not in federation.clients {names}")
        if len(set(self.attack.clients)) != len(self.attack.clients):
            raise ValueError(f"attack.clients: names must be unique, got {self.attack.clients}")
        return self

    @model_validator(mode="after")
    def _checkpointing_without_dp_sgd(self) -> "ExperimentConfig":
        if self.train.activation_checkpointing and self.security.dp.document is not None:
            raise ValueError(
                "train.activation_checkpointing does not work with security.dp.document: opacus' per-sample "
                "gradients need each layer's forward pass once; turn one of them off"
            )
        return self

    @model_validator(mode="after")
    def _lora_fits(self) -> "ExperimentConfig":
        from skyfed.lora_checks import check_federated_lora

        try:
            check_federated_lora(self)
        except SkyfedError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> "ExperimentConfig":
        if self.security.dp.client_level or self.security.dp.document is not None:
            from skyfed.security.privacy import check_privacy

            try:
                check_privacy(self)
            except SkyfedError as exc:
                raise ValueError(str(exc)) from None
        return self


def refuse_attack(cfg: ExperimentConfig, command: str) -> None:
    """ConfigError when `cfg` has an active attack section: attacks exist for evaluation in
    simulation (`skyfed run`) only, never in a deployment (`skyfed server`, `skyfed client`)."""
    if cfg.attack.active:
        raise ConfigError(
            f"attack: {command} refuses a config that makes clients {cfg.attack.clients} attack "
            f"({cfg.attack.kind}); attacks are for simulation only (skyfed run): remove the attack section"
        )


# ---------------------------------------------------------------- presets


def _default() -> dict[str, Any]:
    """Three clouds (aws, gcp, azure) train gpt2-tiny on WikiText-2 with FedAvg."""
    return ExperimentConfig().model_dump(mode="json")


def _smoke() -> dict[str, Any]:
    """A seconds-long end-to-end run: tiny model, small data, two rounds."""
    cfg = _default()
    cfg["name"] = "smoke"
    cfg["data"].update(max_train_tokens=60_000, max_valid_tokens=8_000)
    cfg["tokenizer"]["vocab_size"] = 512
    cfg["model"]["preset"] = "gpt2-micro"
    cfg["train"].update(local_steps=5, batch_size=4, seq_len=32, warmup_steps=2)
    cfg["eval"].update(batch_size=8, max_batches=4, final_max_batches=8)
    cfg["federation"]["rounds"] = 2
    return cfg


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {"default": _default, "smoke": _smoke}


def register_preset(name: str, fn: Callable[[], dict[str, Any]]) -> None:
    PRESETS[name] = fn


# ---------------------------------------------------------------- loading


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    detail = "" if isinstance(got, (dict, list)) or first["type"] == "extra_forbidden" else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    if first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        if not first["loc"]:  # a whole-experiment check names its own keys
            return f"{source}: {msg}{more}"
    return f"{source}: {where}: {msg}{detail}{more}"


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str | tuple[str, Any]] | None = None,  # "key.path=yaml" or (key.path, value)
    data: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Preset (default "default") <- YAML file <- `data` (a dict of sections, as a YAML file
    would hold) <- overrides, validated once."""
    name = preset or "default"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    tree = PRESETS[name]()
    source = f"preset {name!r}"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = _deep_merge(tree, loaded)
        source = str(path)
    if data is not None:
        if not isinstance(data, dict):
            raise ConfigError("a config given as data must be a mapping of sections")
        tree = _deep_merge(tree, data)
        source = "config dict" if path is None else f"{source} with a config dict"
    for item in overrides or []:
        key, value = item if isinstance(item, tuple) else parse_override(item)
        _set_path(tree, key, value)
        source = source if source.endswith(" with --set") else f"{source} with --set"
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("params", "overrides"):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
