"""Typed configuration: every default in one place, recipes (TOML) override them.

    Config
      data   what to train on      (corpus, batch size, data directory, token limits)
      task   synthetic tasks only  (copy / repeat-copy: bits, curriculum)
      model  the recurrent network (cell, sizes, dropout)
      dni    plain TBPTT or DNI    (method, beta, lambda, BP(lambda), synthesizer)
      optim  optimizer             (Adam or SGD, lr, clip, plateau decay)
      train  the loop              (truncation, budget, validation, seed, device, logs)

A recipe is a small TOML file with the same sections, plus two top-level keys:
`description = "..."` (one line, shown by `dni-rnn recipes`) and optionally
`extends = "other-recipe"` (start from that recipe, then override). A table
`[method.M]` holds dni keys for one dni.method M only (e.g. the synthesizer that DNI reads,
which plain TBPTT and sg-push do not); it applies after [dni], before `--set`. `--set
section.key=value` on the command line is parsed by the field's type. Unknown sections
or keys and wrongly typed values raise ConfigError with one line naming the key and
listing the known ones.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


from ..errors import ConfigError  # noqa: E402  (defined in the library: distributed raises it)


class NumberOrMode(str):
    """A field that takes a number or one of a few words (`dni.target_scale`): TOML writes
    `1000` or `"rms"`; the value is kept as a float or the word."""


def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


LM_CORPORA = ("ptb-word", "ptb-char", "wikitext-2", "wikitext-103", "text", "hf")
CORPORA = LM_CORPORA + ("copy", "repeat-copy")
TOKENIZERS = ("auto", "word", "char", "sentencepiece")
METHODS = ("bptt", "dni", "dni-aux", "bp-lambda", "sg-push")
SYNTHESIZERS = ("mlp", "gru")
CONTEXTS = ("none", "targets", "inputs", "both")
CONTEXT_CODES = ("onehot", "decoder")
REPEAT_SCHEDULES = ("min", "alternate")
SOLVE_MEASURES = ("errors", "loss")


@dataclass
class DataConfig:
    corpus: str = _f("ptb-word", "what to train on: Penn Treebank, WikiText, local text files "
                                 "(data.path), a Hugging Face dataset (data.hf_name), or a "
                                 "synthetic task", CORPORA)
    data_dir: str = _f("", "folder holding ptb/ or wikitext-2/ (or the files); empty: "
                           "$DNI_RNN_DATA_DIR, the cache, or a download (WikiText: the HF cache)")
    tokenizer: str = _f("auto", "token level of wikitext / text / hf; ptb-word and ptb-char "
                                "carry theirs in the name (another is an error); auto: word, "
                                "char for ptb-char", TOKENIZERS)
    vocab_size: int = _f(0, "sentencepiece: the vocabulary size (0: 8000); word / char: keep "
                            "the most frequent N tokens, the rest become <unk> (0: all); not "
                            "for PTB")
    min_count: int = _f(1, "word / char: training tokens seen fewer times become <unk>, so "
                           "that the model learns <unk> for held-out words training lacks "
                           "(1: keep all; <unk> is reserved anyway); not for PTB or "
                           "sentencepiece")
    path: str = _f("", "text / hf: a folder holding train, valid (or validation, dev) and test "
                       "files or subfolders, or a training file, folder or glob whose path "
                       "says 'train' (valid / test: the same path with 'valid' / 'test')")
    documents: str = _f("file", "text: one document per file or per line (variable-length "
                                "examples, one per line); hf: line = one per dataset row, "
                                "file = each split one stream; the state is zeroed at each "
                                "document start; PTB and WikiText are one stream",
                        ("file", "line"))
    hf_name: str = _f("", "hf: the dataset, e.g. Salesforce/wikitext, or a builder such as "
                          "text or json reading the files of data.path")
    hf_config: str = _f("", "hf: the dataset's configuration, e.g. wikitext-103-v1 (empty: none)")
    hf_split: str = _f("", "hf: our split = the dataset's, e.g. "
                           "train=train,valid=validation,test=test (empty: train, "
                           "validation / valid / dev, test)")
    hf_text_field: str = _f("text", "hf: the column holding the text")
    batch_size: int = _f(20, "parallel streams (language models) or sequences per batch")
    eval_batch_size: int = _f(10, "streams / sequences for validation and test")
    train_tokens: int = _f(0, "use only the first N training tokens (0: all)")
    valid_tokens: int = _f(0, "use only the first N validation tokens (0: all)")
    test_tokens: int = _f(0, "use only the first N test tokens (0: all)")


@dataclass
class TaskConfig:
    bits: int = _f(8, "width of each random binary pattern (copy, repeat-copy)")
    start_length: int = _f(1, "curriculum: the first sequence length")
    length_step: int = _f(1, "curriculum: how much the length grows once solved")
    max_length: int = _f(100, "curriculum: stop growing (and stop training) past this length")
    threshold: float = _f(0.15, "curriculum: a length is solved when the validation error "
                                "is below this many bits per sequence")
    max_repeats: int = _f(5, "repeat-copy: the largest number of repeats")
    repeat_schedule: str = _f("min", "repeat-copy: how N and R grow. min: R = min(N, "
                                     "max_repeats), the curriculum counts N; alternate: stage "
                                     "s = 1, 2, 3, ... is (N, R) = (1, 1), (2, 1), (2, 2), "
                                     "(3, 2), ..., R capped at max_repeats, the curriculum and "
                                     "task.max_length count stages (BP(lambda)'s copy-repeat)",
                              REPEAT_SCHEDULES)
    solve_measure: str = _f("errors", "curriculum: what task.threshold bounds. errors: wrong "
                                      "bits per sequence; loss: the cross-entropy per answer "
                                      "bit, in bits", SOLVE_MEASURES)
    eval_sequences: int = _f(256, "fixed validation sequences per curriculum check")
    episodes: int = _f(1, "training: episodes one after another in each stream of a block "
                          "(the state is reset at each episode's start)")
    random_offsets: bool = _f(False, "training: delay each stream by a random number of "
                                     "blank steps below the episode length, so that chunk "
                                     "boundaries fall at every phase of an episode")


@dataclass
class ModelConfig:
    cell: str = _f("lstm", "recurrent cell (fused kernels)", ("lstm", "gru"))
    embed_dim: int = _f(200, "embedding size (language models)")
    hidden_dim: int = _f(200, "units per layer")
    num_layers: int = _f(2, "stacked recurrent layers")
    dropout: float = _f(0.0, "dropout on embeddings, between layers and before the decoder")
    tie_weights: bool = _f(False, "share embedding and decoder weights")
    init_range: float = _f(0.0, "initialise every weight uniform in [-r, r] (Zaremba et al.: "
                                "0.1; 0: PyTorch's defaults, embeddings and decoder 0.1)")


@dataclass
class DNIConfig:
    method: str = _f("dni", "bptt: plain truncated BPTT; dni: synthetic gradients at chunk "
                            "ends; dni-aux: DNI plus the auxiliary prediction loss; bp-lambda: "
                            "DNI whose synthesizer learns by BP(lambda), with dni.gamma and "
                            "dni.trace_decay (docs/dni.md); sg-push: not DNI, a capped push "
                            "from a raw-unit synthesizer at beta = lambda = dni.push_scale, "
                            "which does not predict the future gradient (docs/dni.md)", METHODS)
    sg_scale: float = _f(0.1, "beta, weight of the synthetic gradient injected at a chunk end")
    bootstrap: typing.Optional[float] = _f(None, "lambda in [0, 1], weight of J^T g_hat in the "
                                                 "synthesizer's target; none: equal to sg_scale "
                                                 "(free, the stable setting)")
    gamma: float = _f(0.9, "bp-lambda only: the discount gamma in [0, 1], the weight of J^T "
                           "g_hat in the synthesizer's TD target (what dni.bootstrap is to dni)")
    push_scale: float = _f(0.0125, "sg-push only: its beta = lambda (raw targets, each stream's "
                                   "output capped at dni.sg_cap real-gradient RMS norms)")
    trace_decay: float = _f(1.0, "bp-lambda only: BP(lambda)'s lambda in [0, 1]; the "
                                 "synthesizer's eligibility traces decay by gamma x trace_decay "
                                 "per chunk (0: the one-step target, dni with bootstrap = gamma; "
                                 "1: regression onto the discounted real future gradient)")
    trace_horizon: int = _f(32, "bp-lambda only: how many chunks back the traces reach (each "
                                "keeps its chunk: inputs, weights, random state; or, when the "
                                "state has at most this many features, its state Jacobian)")
    synthesizer: str = _f("mlp", "mlp: a feed-forward synthesizer over the state "
                                 "(dni.synth_layers); gru: a GRU over the stream's boundary "
                                 "states, carried and reset like the model's state "
                                 "(dni.synth_hidden units)", SYNTHESIZERS)
    synth_layers: int = _f(1, "hidden layers of the MLP synthesizer (0: linear)")
    synth_hidden: int = _f(0, "units per synthesizer hidden layer, or of the GRU synthesizer "
                              "(0: the state size)")
    target_scale: NumberOrMode = _f("rms", "units of the synthesizer's targets: rms (divided by their "
                                  "running RMS), raw, sum, or a number")
    sg_cap: float = _f(1.0, "cap on each stream's synthetic gradient, in running RMS norms of "
                            "the real gradients at the triggers (0: no cap)")
    guard: bool = _f(True, "recover from a diverging synthesizer (its target RMS up 100x within "
                           "500 updates, or the injected gradient above the real one): re-zero "
                           "it, halve beta")
    calibrate: bool = _f(False, "inject the synthetic gradient times its measured calibration "
                               "against the real gradients, clamped to [0, 1] (0 while it "
                               "predicts nothing)")
    synth_lr: float = _f(0.0, "own Adam learning rate for the synthesizer (0: share the "
                              "model's optimizer)")
    synth_clip: float = _f(0.0, "gradient-norm clip of the synthesizer, separate (0: none)")
    warmup: int = _f(0, "updates during which the synthesizer trains but nothing is injected")
    replay: int = _f(0, "extra synthesizer updates per chunk on recent triggers and their real "
                        "gradients (0: off; docs/dni.md)")
    replay_chunks: int = _f(32, "how many recent chunks the synthesizer's replay buffer holds")
    refit: float = _f(0.0, "after every update, set the synthesizer's last layer to the ridge "
                           "regression on the replay buffer, with this penalty (0: off; "
                           "docs/dni.md)")
    refit_every: int = _f(1, "refit after one update in this many (dni.refit > 0)")
    refit_decay: float = _f(1.0, "the refit's weight of a kept chunk per chunk of age, in (0, 1] "
                                 "(1: the last dni.replay_chunks chunks weigh the same)")
    aux_weight: float = _f(0.1, "weight of the auxiliary loss (dni-aux only)")
    context: str = _f("none", "cDNI: the synthesizer at a boundary also sees the data of the "
                              "train.truncation steps after it: targets, inputs or both (the "
                              "copy tasks' vectors, a language model's tokens coded by "
                              "dni.context_code; none: the state alone; docs/dni.md)", CONTEXTS)
    context_steps: int = _f(0, "how many steps after a boundary the cDNI context covers (0: "
                               "train.truncation)")
    context_code: str = _f("onehot", "how a language model's context tokens are encoded: onehot "
                                     "(a vocabulary-sized code a token; characters) or decoder "
                                     "(the model's own decoder row of each token, hidden_dim "
                                     "features; words; docs/dni.md)", CONTEXT_CODES)
    products: int = _f(0, "cDNI with a linear refit synthesizer: also read the products of "
                          "the state's first this-many principal components (of the replay "
                          "buffer, refreshed every dni.replay_chunks refits) with every context "
                          "feature (0: off; docs/dni.md)")


@dataclass
class OptimConfig:
    name: str = _f("adam", "optimizer", ("adam", "sgd"))
    lr: float = _f(1e-3, "learning rate")
    weight_decay: float = _f(0.0, "L2 weight decay")
    kernel: str = _f("auto", "how the optimizers update the parameters: auto (torch's "
                             "choice), foreach (one multi-tensor kernel per operation) or "
                             "fused (one kernel for the whole step); the last two may change "
                             "the last bits of the update", ("auto", "foreach", "fused"))
    clip: float = _f(0.25, "gradient-norm clip of the model's parameters only (0: none)")
    plateau_factor: float = _f(0.5, "multiply the lr by this when validation stops "
                                    "improving (1: never)")
    plateau_patience: int = _f(0, "validations without improvement before the lr decays")
    min_lr: float = _f(1e-5, "the lr never decays below this")
    decay_after: int = _f(0, "after each epoch from this one on, multiply the lr by "
                             "optim.decay_factor (Zaremba et al.: 4; 0: off)")
    decay_factor: float = _f(0.5, "the per-epoch lr factor of optim.decay_after")


@dataclass
class TrainConfig:
    truncation: int = _f(35, "T, steps per TBPTT chunk")
    random_truncation: bool = _f(False, "awd-lstm style random chunk lengths around T")
    epochs: int = _f(1, "passes over the training streams (language models)")
    max_steps: int = _f(0, "stop after this many updates (0: no limit)")
    max_tokens: int = _f(0, "stop after this many training tokens, the token budget (0: none)")
    eval_interval: int = _f(0, "validate every N updates (0: at the end of each epoch)")
    eval_tokens: int = _f(0, "validate every N training tokens (0: off; used by compare)")
    log_interval: int = _f(100, "one log line every N updates")
    early_stop: int = _f(0, "stop after N validations without improvement (0: off)")
    seed: int = _f(1, "seeds torch, python, numpy and the data generators")
    deterministic: bool = _f(True, "torch.use_deterministic_algorithms (bit-exact resume)")
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    threads: int = _f(0, "CPU threads for torch (0: a share of the cores, cores / runs of "
                         "this machine that also say 0, adjusted at each log line; set N for "
                         "bit-reproducible numbers; 1 is fastest for small models)")
    on_nonfinite: str = _f("raise", "a NaN/inf loss: stop (raise) or drop the update (skip)",
                           ("raise", "skip"))
    diagnose_every: int = _f(0, "every N updates, compare the synthetic gradient with the true "
                                "future gradient by exact BPTT (0: off; docs/dni.md)")
    diagnose_horizons: str = _f("1,2,4,8", "horizons of the diagnostics, in chunks")
    progress: bool = _f(True, "tqdm progress bar (on a terminal)")
    tensorboard: bool = _f(False, "also write TensorBoard scalars (needs tensorboard)")
    test: bool = _f(True, "evaluate the best checkpoint on the test split at the end")
    checkpoint_every: int = _f(0, "also write last.pt every N updates (0: off)")
    checkpoint_minutes: float = _f(10.0, "also write last.pt when this many minutes of "
                                         "training passed since the last checkpoint (0: off)")
    out_dir: str = _f("", "run directory (empty: runs/<recipe>-<method>-T<T>-s<seed>)")


SECTIONS = {"data": DataConfig, "task": TaskConfig, "model": ModelConfig, "dni": DNIConfig,
            "optim": OptimConfig, "train": TrainConfig}
TOP_KEYS = ("description", "extends")
METHOD_TABLE = "method"  # [method.dni]: dni keys a recipe gives one dni.method only


@dataclass
class Config:
    """The whole configuration of one run. `recipe` and `description` name it."""

    recipe: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dni: DNIConfig = field(default_factory=DNIConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- conversions ---------------------------------------------------------------

    def to_dict(self):
        """Plain values only (str, int, float, bool, None): safe inside a checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, where="config"):
        """Build a Config from `to_dict()` output (or a parsed recipe), type-checked."""
        cfg = cls(recipe=d.get("recipe", "custom"), description=d.get("description", ""))
        for key, value in d.items():
            if key in ("recipe", "description", "extends"):
                continue
            if key not in SECTIONS:
                raise ConfigError(f"{where}: unknown section [{key}]; known sections: "
                                  f"{', '.join(SECTIONS)}")
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be a table [{key}]")
            for k, v in value.items():
                set_value(cfg, f"{key}.{k}", v, where=where)
        return cfg

    def to_toml(self):
        """The resolved config as a recipe that `dni-rnn train` can run again."""
        lines = [f"# resolved configuration of recipe {self.recipe!r}",
                 f"description = {_toml_value(self.description)}", ""]
        for name in SECTIONS:
            lines.append(f"[{name}]")
            for f in dataclasses.fields(SECTIONS[name]):
                value = getattr(getattr(self, name), f.name)
                if value is None:
                    lines.append(f"# {f.name} = none")
                else:
                    lines.append(f"{f.name} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def save(self, run_dir):
        """Write config.toml (re-runnable) and config.json (exact) into `run_dir`."""
        run_dir = Path(run_dir)
        (run_dir / "config.toml").write_text(self.to_toml(), encoding="utf-8")
        (run_dir / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n",
                                             encoding="utf-8")

    def run_name(self):
        return f"{self.recipe}-{self.dni.method}-T{self.train.truncation}-s{self.train.seed}"


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))  # a TOML basic string is a JSON string for our values


# ---- type checking and overrides ------------------------------------------------------

def _field_types(section_cls):
    hints = typing.get_type_hints(section_cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(section_cls)}


def _unwrap_optional(tp):
    """(inner type, optional?) for `Optional[X]` / `X | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp):
    inner, optional = _unwrap_optional(tp)
    name = "number or word" if inner is NumberOrMode else inner.__name__
    return name + (" or none" if optional else "")


def coerce(value, tp, key):
    """Check (TOML values) or parse (strings from --set) `value` as type `tp`."""
    inner, optional = _unwrap_optional(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if inner is NumberOrMode:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, str):
            raise bad
        try:
            return float(value)
        except ValueError:
            return value.strip()
    if isinstance(value, str) and inner is not str:
        text = value.strip()
        if optional and text.lower() in ("none", "null", ""):
            return None
        if inner is bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            raise bad
        try:
            return inner(text.replace("_", "")) if inner is int else inner(text)
        except ValueError:
            raise bad from None
    if value is None:
        if optional:
            return None
        raise bad
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if inner is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad  # pragma: no cover


def set_value(cfg, dotted, value, where="--set"):
    """Set `section.key` of `cfg` to `value` (parsed by the field's type when a string)."""
    if "." not in dotted:
        raise ConfigError(f"{where}: {dotted!r} is not section.key; known sections: "
                          f"{', '.join(SECTIONS)}")
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r} in {dotted!r}; known "
                          f"sections: {', '.join(SECTIONS)}")
    fields = _field_types(SECTIONS[section])
    if key not in fields:
        raise ConfigError(f"{where}: unknown key {dotted!r}; known keys of [{section}]: "
                          f"{', '.join(fields)}")
    tp, f = fields[key]
    parsed = coerce(value, tp, f"{where}: {dotted}")
    choices = f.metadata.get("choices")
    if choices and parsed not in choices:
        raise ConfigError(f"{where}: {dotted} must be one of {', '.join(choices)}, got {parsed!r}")
    setattr(getattr(cfg, section), key, parsed)


def apply_overrides(cfg, overrides):
    """Apply `--set section.key=value` strings in order; returns `cfg`."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value)
    return cfg


def validate(cfg):
    """Cross-field checks that a type alone cannot express; returns `cfg`."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    need(cfg.data.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    need(cfg.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1")
    need(cfg.train.truncation >= 1, f"train.truncation must be >= 1, got {cfg.train.truncation}")
    need(cfg.model.hidden_dim >= 1 and cfg.model.num_layers >= 1,
         "model.hidden_dim and model.num_layers must be >= 1")
    need(0.0 <= cfg.model.dropout < 1.0, f"model.dropout must lie in [0, 1), got {cfg.model.dropout}")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(cfg.dni.sg_scale >= 0, f"dni.sg_scale must be >= 0, got {cfg.dni.sg_scale}")
    need(cfg.dni.bootstrap is None or 0.0 <= cfg.dni.bootstrap <= 1.0,
         f"dni.bootstrap must lie in [0, 1] or be none, got {cfg.dni.bootstrap}")
    need(cfg.dni.synth_layers >= 0, "dni.synth_layers must be >= 0")
    need(cfg.dni.replay >= 0, f"dni.replay must be >= 0 (0: off), got {cfg.dni.replay}")
    need(cfg.dni.replay_chunks >= 1, f"dni.replay_chunks must be >= 1, got {cfg.dni.replay_chunks}")
    need(cfg.dni.context_steps >= 0, "dni.context_steps must be >= 0 (0: train.truncation), "
         f"got {cfg.dni.context_steps}")
    need(cfg.dni.context_code == "onehot" or cfg.data.corpus in LM_CORPORA,
         f"dni.context_code={cfg.dni.context_code} encodes a language model's tokens; the "
         f"{cfg.data.corpus} task's context is its own vectors (leave dni.context_code=onehot)")
    need(cfg.dni.refit_every >= 1, f"dni.refit_every must be >= 1, got {cfg.dni.refit_every}")
    need(cfg.dni.refit >= 0, f"dni.refit must be >= 0 (0: off), got {cfg.dni.refit}")
    need(0 < cfg.dni.refit_decay <= 1,
         f"dni.refit_decay must lie in (0, 1] (1: equal weights), got {cfg.dni.refit_decay}")
    need(cfg.dni.sg_cap >= 0, f"dni.sg_cap must be >= 0 (0: no cap), got {cfg.dni.sg_cap}")
    need(cfg.dni.products >= 0, f"dni.products must be >= 0 (0: off), got {cfg.dni.products}")
    need(not cfg.dni.products or (cfg.dni.context != "none" and cfg.dni.synth_layers == 0
                                  and cfg.dni.refit > 0 and cfg.dni.synthesizer == "mlp"),
         f"dni.products={cfg.dni.products} needs the linear refit cDNI synthesizer: "
         "dni.context set, dni.synth_layers=0 and dni.refit > 0 (or dni.products=0)")
    _validate_bp_lambda(cfg.dni, need)
    _validate_sg_push(cfg.dni, need)
    target_scale(cfg)
    need(0 < cfg.optim.plateau_factor <= 1, "optim.plateau_factor must lie in (0, 1]")
    need(0 < cfg.optim.decay_factor <= 1, "optim.decay_factor must lie in (0, 1]")
    need(cfg.optim.decay_after >= 0, "optim.decay_after must be >= 0 (0: off)")
    need(cfg.model.init_range >= 0, "model.init_range must be >= 0 (0: the defaults)")
    need(cfg.model.embed_dim == cfg.model.hidden_dim or not cfg.model.tie_weights,
         "model.tie_weights needs model.embed_dim == model.hidden_dim")
    need(cfg.train.log_interval >= 1, "train.log_interval must be >= 1")
    need(cfg.train.checkpoint_minutes >= 0,
         f"train.checkpoint_minutes must be >= 0 (0: off), got {cfg.train.checkpoint_minutes}")
    for key in ("max_steps", "max_tokens", "eval_interval", "eval_tokens", "early_stop",
                "checkpoint_every"):
        value = getattr(cfg.train, key)
        need(value >= 0, f"train.{key} must be >= 0 (0: off), got {value}")
    need(cfg.train.epochs >= 1, f"train.epochs must be >= 1, got {cfg.train.epochs}")
    need(cfg.train.diagnose_every >= 0, "train.diagnose_every must be >= 0 (0: off)")
    horizons(cfg)
    need(cfg.task.start_length >= 1 and cfg.task.length_step >= 1,
         "task.start_length and task.length_step must be >= 1")
    need(cfg.task.episodes >= 1, f"task.episodes must be >= 1, got {cfg.task.episodes}")
    need(cfg.task.repeat_schedule == "min" or cfg.data.corpus == "repeat-copy",
         "task.repeat_schedule=alternate grows the repeats of data.corpus=repeat-copy; "
         f"data.corpus is {cfg.data.corpus!r}")
    device = cfg.train.device
    need(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"),
         f"train.device must be auto, cpu, cuda or cuda:N, got {device!r}")
    _validate_data(cfg.data, need)
    return cfg


def _validate_bp_lambda(d, need):
    need(0.0 <= d.gamma <= 1.0, f"dni.gamma must lie in [0, 1], got {d.gamma}")
    need(0.0 <= d.trace_decay <= 1.0, f"dni.trace_decay must lie in [0, 1], got {d.trace_decay}")
    need(d.trace_horizon >= 1, f"dni.trace_horizon must be >= 1 chunk, got {d.trace_horizon}")
    need(d.method != "bp-lambda" or d.bootstrap is None,
         f"dni.bootstrap={d.bootstrap} is dni's target weight; with dni.method=bp-lambda set "
         "the discount dni.gamma instead (and leave dni.bootstrap none)")
    need(d.context == "none" or (d.synthesizer == "mlp" and not
                                 (d.method == "bp-lambda" and d.trace_decay > 0)),
         f"dni.context={d.context} needs dni.synthesizer=mlp and no BP(lambda) traces "
         "(dni.trace_decay=0); set dni.context=none")
    need(d.synthesizer != "gru" or not (d.replay or d.refit),
         "dni.synthesizer=gru cannot replay or refit (its message depends on a memory the "
         "stored triggers lack); set dni.replay=0 and dni.refit=0, or dni.synthesizer=mlp")


def _validate_sg_push(d, need):
    if d.method != "sg-push":
        return
    need(d.push_scale >= 0, f"dni.push_scale must be >= 0, got {d.push_scale}")
    need(d.sg_cap > 0, "dni.method=sg-push is a capped push: set dni.sg_cap > 0 (1: the "
                       "real gradients' RMS norm)")
    default = DNIConfig()
    need((d.target_scale, d.sg_scale, d.bootstrap) ==
         (default.target_scale, default.sg_scale, default.bootstrap),
         "dni.method=sg-push sets raw targets and beta = lambda = dni.push_scale itself; "
         "leave dni.target_scale, dni.sg_scale and dni.bootstrap unset (or set them with "
         "dni.method=dni)")


def bootstrap_and_traces(cfg):
    """(bootstrap, trace_decay) for the runner: bp-lambda's are gamma and dni.trace_decay;
    sg-push's bootstrap is dni.push_scale; the other methods keep dni.bootstrap and no
    traces."""
    if cfg.dni.method == "bp-lambda":
        return cfg.dni.gamma, cfg.dni.trace_decay
    if cfg.dni.method == "sg-push":
        return cfg.dni.push_scale, 0.0
    return cfg.dni.bootstrap, 0.0


def sg_scale(cfg):
    """beta for the runner: dni.push_scale for sg-push, dni.sg_scale otherwise."""
    return cfg.dni.push_scale if cfg.dni.method == "sg-push" else cfg.dni.sg_scale


def _validate_data(d, need):
    need(d.vocab_size >= 0, f"data.vocab_size must be >= 0 (0: the default), got {d.vocab_size}")
    need(d.min_count >= 1, f"data.min_count must be >= 1 (1: keep all), got {d.min_count}")
    need(d.min_count == 1 or (d.corpus not in ("ptb-word", "ptb-char")
                              and data_tokenizer(d) != "sentencepiece"),
         f"data.min_count={d.min_count}: only a word or char vocabulary built from the "
         f"training text (data.corpus=text, hf, wikitext) prunes rare tokens")
    if d.corpus in ("ptb-word", "ptb-char"):
        level = d.corpus[len("ptb-"):]
        other = "char" if level == "word" else "word"
        need(d.tokenizer in ("auto", level),
             f"data.tokenizer={d.tokenizer} conflicts with data.corpus={d.corpus}, whose level "
             f"is in its name; use data.corpus=ptb-{other}, data.tokenizer=auto, or "
             f"data.corpus=text with data.path on the PTB files")
        need(d.vocab_size == 0, f"data.vocab_size={d.vocab_size}: {d.corpus} has a fixed "
                                f"vocabulary; leave it 0, or use data.corpus=text with data.path")
    need(d.corpus != "text" or d.path.strip(),
         "data.corpus=text needs data.path: a folder with train/valid/test files, or a "
         "training file, folder or glob whose path says 'train'")
    need(d.corpus != "hf" or d.hf_name.strip(),
         "data.corpus=hf needs data.hf_name, e.g. Salesforce/wikitext (with data.hf_config), "
         "or text (with data.path)")
    hf_split_map(d)


def data_tokenizer(d):
    """data.tokenizer with "auto" resolved.

    Args:
        d: a DataConfig.
    Returns:
        "word", "char" or "sentencepiece" ("auto": char for ptb-char, else word).
    """
    if d.tokenizer != "auto":
        return d.tokenizer
    return "char" if d.corpus == "ptb-char" else "word"


HF_SPLIT_KEYS = ("train", "valid", "test")


def hf_split_map(d):
    """data.hf_split as `corpora.load_hf`'s split_names.

    Args:
        d: a DataConfig; hf_split like "train=train,valid=validation,test=test".
    Returns:
        {"valid": "validation", ...} (our split -> the dataset's), or None when empty.
    Raises:
        ConfigError: an item that is not our_split=dataset_split.
    """
    text = d.hf_split.strip()
    if not text:
        return None
    mapping = {}
    for item in text.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not value or key not in HF_SPLIT_KEYS or key in mapping:
            raise ConfigError(f"data.hf_split: expected our_split=dataset_split separated by "
                              f"commas, our splits being {', '.join(HF_SPLIT_KEYS)}; got "
                              f"{d.hf_split!r}")
        mapping[key] = value
    return mapping


def horizons(cfg):
    """train.diagnose_horizons as a sorted list of ints >= 1."""
    return parse_horizons(cfg.train.diagnose_horizons, "train.diagnose_horizons")


def parse_horizons(text, key):
    """"1,2,4,8" -> [1, 2, 4, 8]; a one-line ConfigError naming `key` otherwise."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise ConfigError(f"{key} must be chunk counts >= 1 such as 1,2,4,8, got {text!r}")
    return values


def target_scale(cfg):
    """dni.target_scale as the runner wants it: "rms", "raw", "sum" or a float (raw for
    sg-push)."""
    value = "raw" if cfg.dni.method == "sg-push" else cfg.dni.target_scale
    if value in ("rms", "raw", "sum"):
        return value
    if isinstance(value, float) and value > 0:
        return value
    raise ConfigError(f"dni.target_scale must be rms, raw, sum or a number > 0, got {value!r}")


# ---- recipes ---------------------------------------------------------------------------

def recipes_dir():
    """The folder of shipped recipes (the installed `recipes` package)."""
    import recipes
    return Path(recipes.__file__).parent


def shipped_recipes():
    """{name: path} of the shipped recipes, sorted by name."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.toml"), key=lambda p: p.stem)}


def recipe_path(name_or_path):
    """A shipped recipe's name or a path to a TOML file -> the file's path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith(".toml") or path.parent != Path("."):
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path
    known = shipped_recipes()
    if text not in known:
        raise ConfigError(f"unknown recipe {text!r}; shipped recipes: {', '.join(known)} "
                          "(or give a path to a .toml file)")
    return known[text]


def read_recipe(path):
    """The raw tables of one recipe file, without following `extends`."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path}: not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"recipe {path}: cannot read ({e.strerror})") from None


def _merged_tables(path, seen=()):
    raw = read_recipe(path)
    for key, value in raw.items():
        if not isinstance(value, dict) and key not in TOP_KEYS:
            raise ConfigError(f"recipe {path}: unknown top-level key {key!r}; known: "
                              f"{', '.join(TOP_KEYS)} and the sections {', '.join(SECTIONS)}")
    parent = raw.get("extends")
    merged = {}
    if parent:
        parent_path = recipe_path(parent)
        if parent_path.resolve() in seen:
            raise ConfigError(f"recipe {path}: extends {parent!r} in a loop")
        merged = _merged_tables(parent_path, seen + (parent_path.resolve(),))
    for key, value in raw.items():
        if isinstance(value, dict) and key != METHOD_TABLE:
            merged.setdefault(key, {}).update(value)
            if key == "dni":  # this file's [dni] outranks the method tables it inherits
                for keys in merged.get(METHOD_TABLE, {}).values():
                    for k in value:
                        keys.pop(k, None)
        elif key == "description":
            merged[key] = value
    if METHOD_TABLE in raw:  # and its own method tables outrank its [dni]
        _check_method_tables(path, raw[METHOD_TABLE])
        for method, keys in raw[METHOD_TABLE].items():
            merged.setdefault(METHOD_TABLE, {}).setdefault(method, {}).update(keys)
    return merged


def _check_method_tables(path, tables):
    if not isinstance(tables, dict):
        raise ConfigError(f"recipe {path}: {METHOD_TABLE} must be tables [{METHOD_TABLE}.M], "
                          f"M a dni.method ({', '.join(METHODS)})")
    for method, keys in tables.items():
        if method not in METHODS or not isinstance(keys, dict):
            raise ConfigError(f"recipe {path}: [{METHOD_TABLE}.{method}] must be a table named "
                              f"after a dni.method ({', '.join(METHODS)})")
        if "method" in keys:
            raise ConfigError(f"recipe {path}: [{METHOD_TABLE}.{method}] cannot set the method")
        probe = Config()
        for k, v in keys.items():  # checked now, not only when that method runs
            set_value(probe, f"dni.{k}", v, where=f"recipe {path}: [{METHOD_TABLE}.{method}]")


def load_recipe(name_or_path, overrides=()):
    """Defaults <- recipe (and what it extends) <- the recipe's `[method.M]` table for the
    chosen dni.method M <- `--set` overrides, validated.

    Args:
        name_or_path: a shipped recipe's name (`dni-rnn recipes`) or a TOML file.
        overrides: `section.key=value` strings.
    Returns:
        Config
    Raises:
        ConfigError: one line naming the recipe, section or key at fault.
    """
    path = recipe_path(name_or_path)
    tables = _merged_tables(path, (path.resolve(),))
    by_method = tables.pop(METHOD_TABLE, {})
    cfg = apply_overrides(Config.from_dict(tables, where=f"recipe {path.name}"), overrides)
    if cfg.dni.method in by_method:  # the dni keys this recipe gives the chosen method only
        tables["dni"] = {**tables.get("dni", {}), **by_method[cfg.dni.method]}
        cfg = apply_overrides(Config.from_dict(tables, where=f"recipe {path.name}"), overrides)
    cfg.recipe = path.stem
    return validate(cfg)


def describe_recipe(path):
    """The one-line description of a recipe file (following `extends` if it has none)."""
    try:
        return _merged_tables(Path(path), (Path(path).resolve(),)).get("description", "")
    except ConfigError as e:
        return f"(broken: {e})"


def config_keys():
    """[(section.key, type, default, help)] of every config field, for docs and errors."""
    rows = []
    for name, cls in SECTIONS.items():
        for key, (tp, f) in _field_types(cls).items():
            choices = f.metadata.get("choices")
            help = f.metadata.get("help", "")
            if choices:
                help += f" ({' / '.join(choices)})"
            rows.append((f"{name}.{key}", _type_name(tp), f.default, help))
    return rows
