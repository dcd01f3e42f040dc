"""One run configuration, assembled in layers and validated.

Order (later wins): trainer defaults <- dataset defaults <- method defaults <- the dataset's
per-method values from the papers (e.g. IPRM's alpha per dataset) <- YAML file <- CLI
``--set key=value``. Keys are flat (``lr``, ``alpha``, ``image_noise``) except the backbone
table, addressed as ``backbone.<modality>.<field>`` (``backbone.visual=resnet18`` is short for
``backbone.visual.name=resnet18``). Every key must be known to the trainer, the dataset or the
method: a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmbalance.errors import ConfigError, MMBalanceError, did_you_mean
from mmbalance.registry import DATASETS, METHODS


@dataclass(frozen=True)
class Search:
    """The range a tuner searches for one option: numbers from ``low`` to ``high`` (inclusive;
    ``log`` samples evenly in the logarithm, ``step`` keeps a grid), or one of ``choices``.

    Declared beside the option (``Option(..., search=Search(1e-4, 1e-1, log=True))``) so every
    method carries the ranges its paper or official code motivates, and a tuner of any method
    reads them from one place. Checked when declared: a range that cannot be sampled is a
    programming error in the plugin, not something a user should meet mid-study."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    #: sampled only when each named option takes one of its listed values (another option's
    #: values: ``when={"alpha_schedule": ("exp",)}``); kept as sorted (key, values) pairs
    when: Any = None

    def __post_init__(self) -> None:
        if self.when is not None:
            object.__setattr__(self, "when", _conditions(self.when, self))
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise SearchRangeError(f"{self}: give either choices or low/high (with log or step), not both.")
            if not isinstance(self.choices, tuple):
                object.__setattr__(self, "choices", tuple(self.choices))
            if len(self.choices) < 2:
                raise SearchRangeError(f"{self}: a search over choices needs at least two of them.")
            return
        for name in ("low", "high"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
                raise SearchRangeError(f"{self}: '{name}' must be a number (got {value!r}), e.g. Search(0.1, 1.0).")
        if not self.low < self.high:
            raise SearchRangeError(f"{self}: low must be below high (got low={self.low!r}, high={self.high!r}).")
        if self.log and self.low <= 0:
            raise SearchRangeError(f"{self}: a log range needs low > 0 (got low={self.low!r}); "
                                   f"use a linear range to include 0.")
        if self.step is not None:
            if self.log:
                raise SearchRangeError(f"{self}: a log range takes no step (Optuna samples it continuously).")
            if not isinstance(self.step, int | float) or isinstance(self.step, bool) or not self.step > 0:
                raise SearchRangeError(f"{self}: step must be a number > 0 (got {self.step!r}).")

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def __repr__(self) -> str:
        """The fields, ``when`` only where set: a study's key hashes this text, so a range
        declared before conditions existed keeps the key (and the study) it had."""
        when = f", when={self.when!r}" if self.when else ""
        return (f"Search(low={self.low!r}, high={self.high!r}, log={self.log!r}, step={self.step!r}, "
                f"choices={self.choices!r}{when})")

    def text(self) -> str:
        """One line for the docs: 'log 1e-05 .. 0.1', '0 .. 1 step 0.1', 'one of a, b', and
        the condition: '0.05 .. 1, when alpha_schedule is exp'."""
        return self._range_text() + (f", when {self.when_text()}" if self.when else "")

    def when_text(self) -> str:
        return " and ".join(f"{k} is {' or '.join(map(str, v))}" for k, v in self.when or ())

    def applies(self, values: Mapping[str, Any]) -> bool:
        """Whether the option is sampled, given the values of the options it depends on."""
        return all(k in values and values[k] in allowed for k, allowed in self.when or ())

    def _range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        def num(v: float) -> str:
            return str(v) if isinstance(v, int) else f"{v:g}"
        body = f"{num(self.low)} .. {num(self.high)}"
        if self.log:
            return f"log {body}"
        return f"{body} step {num(self.step)}" if self.step is not None else body


def _conditions(when: Any, search: Search) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``when`` as sorted (option, values) pairs; its form checked here, its options and
    values against the plugin's table by :func:`check_search_conditions`."""
    if not isinstance(when, Mapping) or not when:
        raise SearchRangeError(f"Search when={when!r}: give a mapping of option names to the values under which "
                               f"this option is searched, e.g. when={{'alpha_schedule': ('exp',)}}.")
    out = []
    for key, values in when.items():
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise SearchRangeError(f"Search when={dict(when)!r}: the values of '{key}' must be a tuple or list "
                                   f"(e.g. ('exp',)), not {values!r}.")
        values = tuple(values)
        if not isinstance(key, str) or not values:
            raise SearchRangeError(f"Search when={dict(when)!r}: '{key}' needs an option name and at least one value.")
        out.append((key, values))
    return tuple(sorted(out))


def check_search_conditions(options: Mapping[str, Any], where: str, others: Mapping[str, Any] = ()) -> None:
    """Every ``Search(when=...)`` of ``options`` names an option of ``options`` or ``others``
    (the trainer's) that has fixed values (choices or a flag), and only values among them: a
    condition that can never hold, or names a typo, would silently stop a search."""
    table = {**{k: as_option(v) for k, v in dict(others).items()}, **{k: as_option(v) for k, v in options.items()}}
    for key, opt in table.items():
        if key not in options or opt.search is None or not opt.search.when:
            continue
        for dep, values in opt.search.when:
            if dep == key or dep not in table:
                known = ", ".join(k for k in options if k != key)
                raise SearchRangeError(f"{where}: the search of '{key}' depends on '{dep}', which is "
                                       + ("itself" if dep == key else "no option here")
                                       + f" (the options of {where}: {known}; and the trainer's).")
            target = table[dep]
            kind = target.type or (type(target.default) if target.default is not None else None)
            allowed = target.choices if target.choices is not None else ((True, False) if kind is bool else None)
            if allowed is None:
                raise SearchRangeError(f"{where}: the search of '{key}' depends on '{dep}', which has no fixed "
                                       f"values (choices or true/false) to name.")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise SearchRangeError(f"{where}: the search of '{key}' depends on {dep} being "
                                       f"{', '.join(map(repr, bad))}, not among its values {', '.join(map(repr, allowed))}.")


class SearchRangeError(ValueError):
    """A search range that cannot be sampled, or that leaves its option's allowed values."""


@dataclass(frozen=True)
class Option:
    """A config key with its default, allowed values, numeric range and a one-line help.

    ``min`` / ``max`` bound numbers (inclusive unless ``min_open`` / ``max_open``), so a bad
    value is one clear line at config time instead of a traceback deep in torch or sklearn.
    ``changes_results`` says whether the value can change a computed number: only such keys
    enter a run's identity, and only they split a leaderboard row (logging, paths and file
    reading options declare False).
    """

    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    type: type | tuple[type, ...] | None = None  # inferred from the default when None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    changes_results: bool = True
    search: Search | None = None  # the range ``mmbalance tune`` searches; None = not searched

    def __post_init__(self) -> None:
        if self.search is not None:
            _check_search(self)

    def range_text(self) -> str:
        def num(v: float) -> str:  # an int bound in full (a seed's 4294967295, not 4.29497e+09)
            return str(v) if isinstance(v, int) else f"{v:g}"

        lo = "" if self.min is None else f"{'>' if self.min_open else '>='} {num(self.min)}"
        hi = "" if self.max is None else f"{'<' if self.max_open else '<='} {num(self.max)}"
        return " and ".join(t for t in (lo, hi) if t)


def _check_search(option: Option) -> None:
    """A declared search range stays inside what its option accepts: choices among the
    option's choices (or true/false for a flag), integer bounds and step for an integer option,
    numbers within min/max. Raised where the plugin is imported, naming the option's help."""
    search = option.search
    label = " ".join(option.help.split()[:8]) or repr(option.default)
    what = f"Search range {search!r} of the option '{label} ...'"
    if not isinstance(search, Search):
        raise SearchRangeError(f"{what}: declare it as a Search(...), e.g. Search(1e-4, 1e-1, log=True).")
    kind = option.type or (type(option.default) if option.default is not None else None)
    if search.choices is not None:
        allowed = option.choices if option.choices is not None else ((True, False) if kind is bool else None)
        if allowed is not None:
            bad = [c for c in search.choices if c not in allowed]
            if bad:
                raise SearchRangeError(f"{what}: {', '.join(map(repr, bad))} not among the option's values "
                                       f"{', '.join(map(repr, allowed))}.")
        return
    if option.choices is not None or kind in (bool, str, list, dict, tuple):
        raise SearchRangeError(f"{what}: a numeric range on a non-numeric option; use Search(choices=(...)).")
    if kind is int and not search.is_int:
        raise SearchRangeError(f"{what}: the option is an integer, so low, high and step must be integers "
                               f"(got {search.low!r}, {search.high!r}, {search.step!r}).")
    for end in (search.low, search.high):
        if not _within(end, option):
            raise SearchRangeError(f"{what}: {end!r} is outside the option's range ({option.range_text()}).")


def _within(value: float, option: Option) -> bool:
    """Whether a number satisfies the option's min/max (open or closed); NaN never does."""
    too_low = option.min is not None and (value <= option.min if option.min_open else value < option.min)
    too_high = option.max is not None and (value >= option.max if option.max_open else value > option.max)
    return not (too_low or too_high or value != value)


def _opt(default: Any, help: str = "", choices: Iterable[Any] | None = None, type=None, **bounds: Any) -> Option:
    return Option(default, help, tuple(choices) if choices is not None else None, type, **bounds)


#: Largest seed: numpy's legacy seeding (and with it every plugin that seeds numpy) takes 32 bits.
MAX_SEED = 2**32 - 1

# Keys owned by the trainer. Datasets and methods override defaults, never add keys here.
TRAINER_OPTIONS: dict[str, Option] = {
    "method": _opt(None, "method plugin name", type=str),
    "dataset": _opt(None, "dataset plugin name", type=str),
    "seed": _opt(0, "random seed (same seed, same machine -> identical metrics)", min=0, max=MAX_SEED),
    "epochs": _opt(20, "training epochs", min=1),
    "batch_size": _opt(64, "training batch size", min=1),
    "eval_batch_size": _opt(None, "evaluation batch size (default: 2 x batch_size)", type=int, min=1, changes_results=False),
    "optimizer": _opt("sgd", "optimizer", ["sgd", "adam", "adamw"]),
    # search range: the recipes of the papers span Adam 1e-4 to SGD 1e-1
    "lr": _opt(0.01, "learning rate", min=0, min_open=True, search=Search(1e-4, 0.3, log=True)),
    "momentum": _opt(0.9, "SGD momentum", min=0, max=1),
    # search range: the recipes use 0 to 5e-4; log-spaced around them
    "weight_decay": _opt(1e-4, "weight decay", min=0, search=Search(1e-6, 1e-2, log=True)),
    "scheduler": _opt("step", "learning-rate schedule, stepped once per epoch", ["none", "step", "cosine"]),
    "step_size": _opt(70, "StepLR period in epochs", min=1),
    "gamma": _opt(0.1, "StepLR decay factor", min=0, min_open=True),
    "grad_clip": _opt(None, "clip the global gradient norm to this value", type=float, min=0, min_open=True),
    "embed_dim": _opt(128, "common encoder output width d (a projection is added if needed)", type=int, min=1),
    "modalities": _opt(None, "modalities to use (comma list); default: the dataset's", type=list),
    "val_fraction": _opt(
        0.1, "fraction of train carved out as validation where the source has none; 0 = validate on "
        "the test split (recorded as such)", min=0, max=1, max_open=True),
    "backbone": _opt({}, "per-modality backbone table: backbone.<modality>.name/weights/<kwarg>", type=dict),
    "device": _opt("auto", "auto | cpu | cuda | cuda:N", type=str, changes_results=False),
    "amp": _opt("auto", "mixed precision: auto = bf16 autocast on CUDA and on CPUs with bf16 hardware (AMX, "
                "AVX512-BF16), fp32 on other CPUs; bf16 = everywhere (emulated and slow on other CPUs); "
                "none = fp32", ["auto", "bf16", "none"]),
    "memory_format": _opt(
        "contiguous", "layout of 4-D conv weights and activations: channels_last is about 1.8x "
        "faster for the CNNs on a CPU (and suits GPU tensor cores) but sums in another order, so "
        "numbers differ from the default in the last bits", ["contiguous", "channels_last"]),
    "num_workers": _opt(None, "data-loader worker processes (default: 0 for in-memory data, else up to 8)", type=int, min=0, changes_results=False),
    "data_root": _opt(None, "data root (also $MMBALANCE_DATA_ROOT); the run's identity holds a fingerprint "
                      "of the data read there, not the path", type=str, changes_results=False),
    "records": _opt("runs", "directory that holds run records", type=str, changes_results=False),
    "select": _opt("best_val", "selection rule shown in the summary", ["last", "best_val", "best_test"], changes_results=False),
    "protocol": _opt(
        "honest", "honest = validate on a split carved from train, select on it (default); paper = "
        "what the official scripts do: train on all of train (val_fraction=0), select the epoch on "
        "the test set (best_test), fp32 (amp=none), the paper's per-dataset recipe",
        ["honest", "paper"]),
    "progress": _opt("auto", "progress bar: auto (on a terminal), on, off", ["auto", "on", "off"], changes_results=False),
    "diagnostics": _opt(True, "after training: linear probes of the frozen encoders and each modality's "
                        "Shapley contribution to the fused accuracy (diagnostics.json, the final row)", changes_results=False),
    "log_epochs": _opt(True, "print one line per epoch (loss, val/test accuracy, per modality, seconds)", changes_results=False),
    "eval_test": _opt(
        True, "evaluate the test split every epoch; false = the run never reads it (no test metrics, no "
        "diagnostics): what a tuning trial runs, so the search cannot see test"),
    "limit_train_batches": _opt(None, "stop each training epoch after this many batches (smoke tests)", type=int, min=1),
    "limit_eval_batches": _opt(None, "evaluate on at most this many batches (smoke tests)", type=int, min=1),
    "checkpoint": _opt(True, "save a checkpoint each epoch so a killed run resumes", changes_results=False),
    "checkpoint_every_s": _opt(0.0, "skip an epoch's checkpoint and record lines until this many seconds passed "
                               "since the last (the last epoch's are always saved; a killed run then repeats at "
                               "most this much, to the same numbers). 0 = every epoch", type=float, min=0.0,
                               changes_results=False),
    "wandb": _opt(False, "log to Weights & Biases (offline unless wandb_mode=online)", changes_results=False),
    "wandb_project": _opt("mmbalance", "wandb project", type=str, changes_results=False),
    "wandb_mode": _opt("offline", "wandb mode", ["offline", "online", "disabled"], changes_results=False),
}

# What every official script does; a dataset adds its paper recipe (``paper_protocol``).
PAPER_PROTOCOL: dict[str, Any] = {"val_fraction": 0.0, "select": "best_test", "amp": "none"}


YAML11_BOOL_WORDS = {"on", "off", "yes", "no", "y", "n"}
BOOL_WORDS = {"true": True, "false": False, "on": True, "off": False, "yes": True, "no": False, "1": True, "0": False}


def parse_value(text: str) -> Any:
    """CLI text -> Python value with YAML's rules (numbers, true/false, null, [lists]).

    YAML 1.1's on/off/yes/no stay strings (``progress=off`` is a choice, not False); boolean
    options accept them anyway.
    """
    if text.strip().lower() in YAML11_BOOL_WORDS:
        return text.strip()
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(
                f"Bad --set argument '{pair}': expected key=value, e.g. --set lr=0.01."
            )
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def read_yaml_mapping(path: str | Path, what: str = "Config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping; every problem is a ConfigError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} '{p}' is a directory. Pass the path of a YAML file.")
    if not p.is_file():
        raise ConfigError(f"{what} '{p}' does not exist. Pass the path of a YAML file.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} '{p}' is not a text file ({exc.reason} at byte {exc.start}). Pass the path of a YAML file.") from exc
    except OSError as exc:
        raise ConfigError(f"{what} '{p}' cannot be read: {exc}.") from exc
    if "\x00" in text:
        raise ConfigError(f"{what} '{p}' is a binary file, not YAML. Pass the path of a YAML file.")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{p}' is not valid YAML: {yaml_error_text(exc, text)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{p}' must hold a mapping of key: value pairs.")
    return data


def yaml_error_text(exc: yaml.YAMLError, text: str) -> str:
    """A YAML syntax error as 'line L, column C: problem', the offending line and a caret under
    the column, and the same for where the unclosed construct began (each on its own line, so
    the CLI keeps them as they are).

    PyYAML's own text names '<unicode string>' instead of the file; this keeps only what
    locates and names the mistake, with 1-based lines and columns as editors count them."""
    lines = text.splitlines() or [""]

    def snippet(mark: Any) -> str:
        if mark.line >= len(lines):
            return "    (the end of the file)"
        source = lines[mark.line].expandtabs(1)
        return f"    {source}\n    {' ' * min(mark.column, len(source))}^"

    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return f"{problem}."
    out = f"line {mark.line + 1}, column {mark.column + 1}: {problem}\n{snippet(mark)}"
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and cmark is not None and cmark.line != mark.line:
        out += f"\n  {context}, which starts at line {cmark.line + 1}, column {cmark.column + 1}:\n{snippet(cmark)}"
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    return flatten_backbone(read_yaml_mapping(path))


def flatten_backbone(data: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a nested ``backbone: {audio: {name: ...}}`` into dotted keys."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k == "backbone" and isinstance(v, Mapping):
            for mod, spec in v.items():
                if isinstance(spec, Mapping):
                    for field, val in spec.items():
                        out[f"backbone.{mod}.{field}"] = val
                else:
                    out[f"backbone.{mod}.name"] = spec
        else:
            out[k] = v
    return out


def _check_type(key: str, value: Any, option: Option, owner: str) -> Any:
    value = _coerce(key, value, option, owner)
    _check_range(key, value, option, owner)
    return value


def _check_range(key: str, value: Any, option: Option, owner: str) -> None:
    if option.min is None and option.max is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if not _within(value, option):  # NaN is never in range
        raise ConfigError(f"Bad value {value!r} for '{key}' ({owner}): it must be {option.range_text()}.")


def _coerce(key: str, value: Any, option: Option, owner: str) -> Any:
    if value is None:
        return None
    if option.choices is not None:
        if isinstance(value, bool) and ("on" if value else "off") in option.choices:
            value = "on" if value else "off"  # YAML 1.1 files read on/off as booleans
        if value not in option.choices:
            raise ConfigError(
                f"Bad value {value!r} for '{key}' ({owner}): allowed values are "
                f"{', '.join(map(str, option.choices))}."
            )
        return value
    expected = option.type or (type(option.default) if option.default is not None else None)
    if expected is None:
        return value
    if expected is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if expected is tuple and isinstance(value, list):
        return tuple(value)
    if expected is bool and isinstance(value, str | int) and str(value).lower() in BOOL_WORDS:
        return BOOL_WORDS[str(value).lower()]
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"Bad value {value!r} for '{key}' ({owner}): expected true or false.")
    if expected in (int, float) and isinstance(value, bool):
        raise ConfigError(f"Bad value {value!r} for '{key}' ({owner}): expected a number.")
    if not isinstance(value, expected):
        name = expected.__name__ if isinstance(expected, type) else str(expected)
        raise ConfigError(
            f"Bad value {value!r} for '{key}' ({owner}): expected {'an' if name[:1] in 'aeiou' else 'a'} {name}, e.g. "
            f"--set {key}={option.default!r}."
        )
    return value


def as_option(v: Any) -> Option:
    return v if isinstance(v, Option) else Option(v)


def assemble(
    dataset_cls: Any,
    method_cls: Any,
    yaml_values: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build and validate the full config for one run. Returns a plain dict.

    ``sources`` names where an override came from when it was not ``--set`` (a grid file's
    cell: "grid file 'g.yaml', set of methods entry 'sum'"), so an error points at the line to
    fix. Every unknown key is reported at once, each with its own suggestion."""
    schema: dict[str, tuple[Option, str]] = {k: (o, "trainer") for k, o in TRAINER_OPTIONS.items()}
    for k, v in dataset_cls.options.items():
        schema[k] = (as_option(v), f"dataset {dataset_cls.name}")
    for k, v in method_cls.options.items():
        if k in schema and schema[k][1] == "trainer":
            raise ConfigError(f"Method {method_cls.name} declares option '{k}', a trainer key.")
        schema[k] = (as_option(v), f"method {method_cls.name}")

    cfg: dict[str, Any] = {k: copy.deepcopy(o.default) for k, (o, _) in schema.items()}
    cfg["backbone"] = {}
    layers: list[tuple[str, Mapping[str, Any]]] = [
        (f"defaults of dataset {dataset_cls.name}", flatten_backbone(dataset_cls.defaults)),
        (f"defaults of method {method_cls.name}", flatten_backbone(method_cls.defaults)),
        (
            f"paper values of {method_cls.name} on {dataset_cls.name}",
            {**getattr(method_cls, "dataset_defaults", {}).get(dataset_cls.name, {}),
             **dataset_cls.method_defaults.get(method_cls.name, {})},
        ),
        ("the YAML file", yaml_values or {}),
        ("--set", overrides or {}),
    ]
    chosen = {**(yaml_values or {}), **(overrides or {})}.get("protocol", "honest")
    if chosen == "paper":  # after the defaults, before the user's own settings
        layers.insert(3, ("the paper protocol", {**PAPER_PROTOCOL, **getattr(dataset_cls, "paper_protocol", {})}))
    unknown: list[str] = []
    for source, values in layers:
        for key, value in values.items():
            where = (sources or {}).get(key, source) if source == "--set" else source
            if key not in schema and not key.startswith("backbone."):
                unknown.append(f"'{key}' (from {where}).{did_you_mean(key, schema)}")
                continue
            _apply(cfg, schema, key, value, where, dataset_cls, method_cls)
    if unknown:
        raise ConfigError(
            (f"Unknown config key {unknown[0]}" if len(unknown) == 1
             else f"Unknown config keys: {' '.join(unknown)}"),
            choices=valid_keys_text(dataset_cls, method_cls),
        )
    cfg["method"] = method_cls.name
    cfg["dataset"] = dataset_cls.name
    return cfg


def _apply(cfg, schema, key, value, source, dataset_cls, method_cls) -> None:
    if key.startswith("backbone."):
        parts = key.split(".")
        if len(parts) not in (3, 2) or not parts[1]:
            raise ConfigError(
                f"Bad key '{key}' from {source}: backbone keys look like "
                f"backbone.<modality>.<field>, e.g. backbone.audio.name=resnet18."
            )
        field = parts[2] if len(parts) == 3 else "name"
        cfg["backbone"].setdefault(parts[1], {})[field] = value
        return
    if key not in schema:
        raise ConfigError(f"Unknown config key '{key}' (from {source}).{did_you_mean(key, schema)}",
                          choices=valid_keys_text(dataset_cls, method_cls))
    if key in CHOSEN_BY_NAME:
        raise ConfigError(
            f"'{key}' cannot be set from {source}: the {key} is chosen by its own argument "
            f"(--{key} NAME on the command line; the '{key}s' list of a grid file). A '{key}' "
            f"setting would be ignored, so the run would not be the one you asked for."
        )
    option, owner = schema[key]
    try:
        cfg[key] = _check_type(key, value, option, owner)
    except ConfigError as exc:
        if source == "--set":
            raise
        raise ConfigError(f"{str(exc).rstrip('.')} (set in {source}).") from exc
    if key == "modalities" and cfg[key]:
        _check_distinct_modalities(cfg[key], source)


def valid_keys_text(dataset_cls: Any, method_cls: Any) -> str:
    """The keys a run of this dataset and method accepts, one line per owner (a grid with bad
    cells of several methods prints the trainer's line once, and each method's once)."""
    return "\n".join([
        f"Valid keys of the trainer: {', '.join(sorted(TRAINER_OPTIONS))}.",
        f"Valid keys of dataset {dataset_cls.name}: {', '.join(sorted(dataset_cls.options)) or 'none'}.",
        f"Valid keys of method {method_cls.name}: {', '.join(sorted(method_cls.options)) or 'none'}.",
    ])


#: Keys that name what a run is, given by their own arguments, never by a setting.
CHOSEN_BY_NAME = ("method", "dataset")


def _check_distinct_modalities(mods: list[Any], source: str) -> None:
    """A modality listed twice would build two encoders of one input and count it as two
    modalities (a 'balance' between a modality and itself)."""
    twice = sorted({str(m) for m in mods if mods.count(m) > 1})
    if twice:
        raise ConfigError(
            f"Bad value {mods!r} for 'modalities' (from {source}): {', '.join(twice)} is listed more "
            f"than once; list each modality once, e.g. --set modalities={','.join(dict.fromkeys(map(str, mods)))}."
        )


def describe(cfg: Mapping[str, Any], dataset_cls: Any, method_cls: Any) -> str:
    """The resolved config as commented YAML lines: value, owner and help of every key, and
    which keys do not change results (``Option.changes_results``)."""
    owners = [("trainer", TRAINER_OPTIONS), (f"dataset {dataset_cls.name}", dataset_cls.options),
              (f"method {method_cls.name}", method_cls.options)]
    lines = []
    for owner, options in owners:
        lines.append(f"# --- {owner} ---")
        for key, opt in options.items():
            if key == "backbone":
                continue
            value = yaml.safe_dump({key: cfg.get(key)}, default_flow_style=True).strip()[1:-1]
            option = as_option(opt)
            # such keys stay out of the run's identity and never split a leaderboard row
            note = "" if option.changes_results else " (not part of the run's identity)"
            lines.append(f"{value}  # {option.help}{note}")
    lines.append("# --- backbones (backbone.<modality>.<field>) ---")
    for mod, entry in cfg["backbone"].items():
        lines.append(f"backbone.{mod}: {yaml.safe_dump(entry, default_flow_style=True).strip()}")
    return "\n".join(lines)


def declared_options(dataset_cls: Any = None, method_cls: Any = None) -> dict[str, tuple[Option, str]]:
    """Every key a run of (dataset, method) can hold: its Option and its owner, one of
    'trainer', 'dataset', 'method' (a method's declaration wins over a dataset's, as in
    ``assemble``). A class that is None (a plugin not installed here) declares nothing."""
    table: dict[str, tuple[Option, str]] = {k: (o, "trainer") for k, o in TRAINER_OPTIONS.items()}
    for cls, owner in ((dataset_cls, "dataset"), (method_cls, "method")):
        for k, v in (getattr(cls, "options", None) or {}).items():
            if k not in TRAINER_OPTIONS:
                table[k] = (as_option(v), owner)
    return table


def registered_plugins(cfg: Mapping[str, Any]) -> tuple[Any, Any]:
    """The dataset and method classes the registry holds under the names in ``cfg`` (None for a
    name that is missing or not registered here, e.g. a record of an uninstalled plugin)."""
    found = []
    for registry, key in ((DATASETS, "dataset"), (METHODS, "method")):
        name = cfg.get(key)
        try:
            found.append(registry.get(name) if isinstance(name, str) else None)
        except MMBalanceError:
            found.append(None)
    return found[0], found[1]


#: Trainer keys added after runs were recorded that enter a run's identity only when set away from
#: their default, so every run folder recorded before keeps its name (``eval_test=false`` records
#: no test metrics: such a run must never stand for one that has them).
IDENTITY_ONLY_WHEN_SET: dict[str, Any] = {"eval_test": True}


def identity(cfg: Mapping[str, Any], dataset_cls: Any = None, method_cls: Any = None) -> dict[str, Any]:
    """The settings that can change a computed number: every key of ``cfg`` except those whose
    Option declares ``changes_results=False`` (logging, paths, file-reading switches). A key no
    declaration is found for (a plugin not installed) counts as result-relevant. Without the
    classes, they are looked up in the registry by the names in ``cfg``."""
    if dataset_cls is None and method_cls is None:
        dataset_cls, method_cls = registered_plugins(cfg)
    declared = declared_options(dataset_cls, method_cls)
    return {k: v for k, v in cfg.items() if (k not in declared or declared[k][0].changes_results)
            and not (k in IDENTITY_ONLY_WHEN_SET and v == IDENTITY_ONLY_WHEN_SET[k])}


def config_hash(
    cfg: Mapping[str, Any], length: int = 12, data: Mapping[str, Any] | None = None,
    dataset_cls: Any = None, method_cls: Any = None,
) -> str:
    """Stable hash of what the run computes (see ``identity``): it names the run folder, so a
    setting declared ``changes_results=False`` never makes a second folder for the same run.

    ``data`` is the dataset's fingerprint of the files it reads: the same settings on other
    data are another run. An empty fingerprint (generated data) leaves the hash as it was.
    """
    ident = identity(cfg, dataset_cls, method_cls)
    if data:
        ident = {**ident, "__data__": dict(data)}
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
