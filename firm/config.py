"""Experiment configuration: the one loader of `firm run`, `firm curate`, `firm critic bench` and `firm eval`.

An experiment is a YAML file. Its values are resolved in a fixed order:

    dataclass defaults  <-  YAML (and the chain of `base:` files it inherits)  <-  command flags  <-  `key.sub=value`

:func:`load_config` does it for every command; only the top-level dataclass (the ``schema``) differs:
``ExperimentConfig`` (`firm run`), ``firm.curation.runner.CurationConfig``, ``firm.bench.run.BenchConfig`` and
``firm.eval.run.EvalConfig``. The experiment is a path or the name of a shipped one (``demo/shapes_edit_cme``,
see :func:`firm.paths.find_experiment`); ``${shipped:...}`` in a value is a file that ships with FIRM
(:mod:`firm.paths`). Command-line flags (`firm critic bench --critic NAME`) replace the YAML's sections they set;
``key=value`` overrides merge into them.

Every component (LightningModule, LightningDataModule, reward, critic backend, ...) owns a small dataclass of its
settings next to its code, exposed as the class attribute ``Config``. A config field that holds a component is
declared with :func:`component_field`; the component is picked by its ``name:`` key through a registry
(:mod:`firm.registry`), and its dataclass becomes the schema of that section.

Unknown keys, wrong types and missing required values are errors (:class:`ConfigError`) that name the key and the
file (or the command-line override) that set it.

Range checks: any config dataclass may define ``validate(self) -> None`` that raises ``ValueError`` for a value out
of range. Write the message as ``"<field>: <problem and what to do>"`` (e.g. ``"rank: must be >= 1, got -1"``):
when ``<field>`` is one of the dataclass's fields, the :class:`ConfigError` names the full key
(``module.policy.lora.rank``) and the file or override that set it; otherwise it names the section. The loader
(:func:`load_config`, :func:`build_component`) calls every ``validate()`` of the resolved config, nested ones
first, after the types are checked; so ``firm run --dry-run`` catches them, before any run directory or model
exists. A ``ValueError`` raised by a dataclass's ``__post_init__`` is reported the same way. ``validate()`` sees
its own section only (not the rest of the experiment); checks across sections belong to the component that joins
them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import omegaconf
import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from firm.paths import experiments_root, find_experiment, shipped
from firm.registry import REGISTRIES, resolve


def _shipped_resolver(relative: str) -> str:
    return str(shipped(relative))


def _tiny_reward_resolver(spec: str) -> str:
    from firm.tiny_checkpoints import tiny_checkpoint  # builds on first use (the builders import transformers)

    return str(tiny_checkpoint(spec))


# ${shipped:experiments/...} / ${shipped:firm/...}: a file that ships with FIRM, found in a checkout or an install.
# ${tiny_reward:NAME}: a tiny random reward-model checkpoint in its real layout, built once (firm/rewards/tiny).
# (OmegaConf 2.4 renamed register_new_resolver to register_resolver; 2.3's register_resolver is the legacy API.)
if hasattr(OmegaConf, "register_new_resolver") and omegaconf.__version__.startswith("2.3"):
    OmegaConf.register_new_resolver("shipped", _shipped_resolver, replace=True)
    OmegaConf.register_new_resolver("tiny_reward", _tiny_reward_resolver, replace=True)
else:
    OmegaConf.register_resolver("shipped", _shipped_resolver, replace=True)
    OmegaConf.register_resolver("tiny_reward", _tiny_reward_resolver, replace=True)

__all__ = [
    "MISSING",
    "ConfigError",
    "build_component",
    "ExperimentConfig",
    "TrainerConfig",
    "component_field",
    "import_extensions",
    "check_run_name",
    "load_config",
    "load_experiment",
    "load_yaml_chain",
    "parse_overrides",
    "save_config",
    "to_object",
    "to_yaml",
    "validate_config",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and where it was set."""


def component_field(
    registry: str, *, optional: bool = False, default_name: str | None = None, many: bool = False
) -> Any:
    """A config field holding a registered component, chosen by its ``name:`` key.

    Args:
        registry: which registry in :data:`firm.registry.REGISTRIES` to look the name up in.
        optional: the section may be left out (the field is then ``None``).
        default_name: the component used when the section gives no ``name:``.
        many: the field is a mapping ``label -> section`` of any number of components of the registry (the critics
            of `firm critic bench`); each section is checked against its component's ``Config``, and a ``null``
            section is left out (so a derived YAML can drop an inherited one). The field defaults to ``{}``.
    """
    metadata = {"registry": registry, "optional": optional, "default_name": default_name, "many": many}
    if many:
        return field(default_factory=dict, metadata=metadata)
    return field(default=None, metadata=metadata)


def check_run_name(name: str) -> None:
    """The ``validate()`` check of a ``name:`` that names an output folder: one plain path component."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"name: must be a plain folder name (no '/', '..' or NUL), got {name!r}")


@dataclass
class TrainerConfig:
    """Settings of the Lightning ``Trainer`` (and of checkpointing)."""

    max_steps: int = -1  # optimizer steps to run; -1 means bounded by max_epochs
    max_epochs: int | None = None  # epochs to run; None with max_steps=-1 means Lightning's default (1000)
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Any = "auto"  # number of devices per node, a list of ids, or "auto"
    num_nodes: int = 1  # nodes; multi-node runs start through torchrun or SLURM (see docs/running.md)
    strategy: str = "auto"  # auto | ddp | fsdp2 (FSDP2 fully_shard; `fsdp` is an alias) | ... (Lightning's names)
    fsdp_sharding: str = "FULL_SHARD"  # fsdp2: FULL_SHARD (free gathered weights after each forward) | SHARD_GRAD_OP
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed | bf16-true
    gradient_clip_val: float | None = None  # clip the gradient norm to this value (None: no clipping)
    accumulate_grad_batches: int = 1  # batches per optimizer step
    log_every_n_steps: int = 10  # how often training metrics are written to the loggers
    val_check_interval: Any = None  # validate every N train batches (int) or fraction of an epoch (float)
    check_val_every_n_epoch: int | None = 1  # validate every N epochs; None when val_check_interval is in steps
    limit_train_batches: Any = None  # cap on train batches per epoch (int or fraction)
    limit_val_batches: Any = None  # cap on validation batches (int or fraction; 0 disables validation)
    num_sanity_val_steps: int = 0  # validation batches run before training starts
    checkpoint_every_n_steps: int = 100  # write a checkpoint (and checkpoints/last.ckpt) every N optimizer steps
    keep_checkpoints: int = 2  # how many step checkpoints to keep besides last.ckpt (-1: all)
    enable_progress_bar: bool | None = None  # None: on when stderr is an interactive terminal
    deterministic: bool | None = None  # torch deterministic algorithms (slower)

    def validate(self) -> None:
        if self.max_steps < -1 or self.max_steps == 0:
            raise ValueError(f"max_steps: must be >= 1, or -1 (bounded by max_epochs), got {self.max_steps}")
        if self.max_epochs is not None and self.max_epochs < -1:
            raise ValueError(f"max_epochs: must be >= 0, -1 (no limit) or null, got {self.max_epochs}")
        for name in ("num_nodes", "accumulate_grad_batches", "log_every_n_steps", "checkpoint_every_n_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < -1:
            raise ValueError(f"keep_checkpoints: must be >= 0, or -1 (keep all), got {self.keep_checkpoints}")
        clip = self.gradient_clip_val
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"gradient_clip_val: must be a finite number > 0 or null, got {clip}")


@dataclass
class ExperimentConfig:
    """A whole experiment: what to build, how to train it, where outputs go."""

    name: str = MISSING  # experiment name; outputs go to <output_root>/<name>/<timestamp>/
    description: str = ""  # one line shown by `firm list`
    seed: int = 0  # seeds python, numpy, torch and dataloader workers
    output_root: str = "runs"  # root folder of run directories
    imports: list[str] = field(default_factory=list)  # python modules or .py files that register extra components
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    module: Any = component_field("modules")  # the LightningModule: {name: ..., **its Config}
    data: Any = component_field("datamodules")  # the LightningDataModule: {name: ..., **its Config}

    def validate(self) -> None:
        check_run_name(self.name)  # the name is a folder of the run directory


# --------------------------------------------------------------------------------------------------------------------
# Loading YAML files


def _load_yaml_file(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None
    if node is None or (isinstance(node, DictConfig) and len(node) == 0 and path.read_text().strip() == ""):
        return OmegaConf.create({})
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: an experiment file must be a mapping of keys to values, got a list")
    return node


def load_yaml_chain(path: Path, _seen: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The YAML file and all its `base:` ancestors, deepest base first, as (source name, mapping)."""
    path = path.resolve()
    if path in _seen:
        cycle = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"{path}: `base:` inheritance forms a cycle: {cycle}")
    node = _load_yaml_file(path)
    layers: list[tuple[str, DictConfig]] = []
    if "base" in node:
        base = node.pop("base")
        bases = [base] if isinstance(base, str) else list(base) if base is not None else []
        for b in bases:
            if not isinstance(b, str):
                raise ConfigError(f"{path}: `base:` must be a path (or a list of paths) to YAML files, got {b!r}")
            layers += load_yaml_chain((path.parent / b), (*_seen, path))
    layers.append((str(_display_path(path)), node))
    return layers


def _display_path(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def parse_overrides(overrides: list[str]) -> list[tuple[str, DictConfig]]:
    """Parse CLI overrides ``key.sub=value`` (values are YAML) into one layer per override."""
    layers = []
    for ov in overrides:
        if "=" not in ov or ov.startswith("="):
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key = ov.split("=", 1)[0]
        try:
            node = OmegaConf.from_dotlist([ov])
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"command-line override {ov!r}: cannot parse ({e})") from None
        if key == "base":
            raise ConfigError("command-line override 'base=...' is not allowed: name the base in the YAML file")
        layers.append((f"command-line override {ov!r}", node))
    return layers


# --------------------------------------------------------------------------------------------------------------------
# Building the schema from the registries


def _select(node: Any, dotted: str) -> Any:
    cur = node
    for part in dotted.split("."):
        if not isinstance(cur, DictConfig) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _source_of(layers: list[tuple[str, DictConfig]], dotted: str, default: str) -> str:
    for src, layer in reversed(layers):
        if _select(layer, dotted) is not None:
            return src
    return default


def _build_schema(
    cls: type,
    raw: Any,
    prefix: str,
    layers: list[tuple[str, DictConfig]],
    top: str,
    components: list[tuple[str, str]] | None = None,
) -> DictConfig:
    """A structured OmegaConf node for dataclass ``cls``, with component fields filled by registry lookups.

    The (dotted key, registry) of the component sections found are appended to ``components`` (when given).
    """
    node = OmegaConf.structured(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub_raw = raw.get(f.name) if isinstance(raw, DictConfig) else None
        registry = f.metadata.get("registry")
        if registry is None:
            ftype = hints.get(f.name)
            if dataclasses.is_dataclass(ftype) and _has_component_fields(ftype):
                node[f.name] = _build_schema(ftype, sub_raw, key + ".", layers, top, components)
            continue
        if f.metadata.get("many"):
            if sub_raw is None:
                continue
            if not isinstance(sub_raw, DictConfig):
                src = _source_of(layers, key, top)
                raise ConfigError(
                    f"{src}: '{key}' must be a mapping of labels to sections with a `name:` key, got {sub_raw!r}"
                )
            for label in sub_raw:
                section = sub_raw.get(label)  # null: left out (kept as null, so that the labels keep their order)
                node[f.name][label] = (
                    None
                    if section is None
                    else _component_schema(registry, section, f"{key}.{label}", None, layers, top, components)
                )
            continue
        if sub_raw is None:
            if f.metadata.get("optional"):
                continue
            default_name = f.metadata.get("default_name")
            if default_name is None:
                choices = ", ".join(sorted(REGISTRIES[registry]))
                raise ConfigError(f"{top}: missing required section '{key}' (give it a `name:`, one of: {choices})")
            sub_raw = OmegaConf.create({"name": default_name})
        node[f.name] = _component_schema(
            registry, sub_raw, key, f.metadata.get("default_name"), layers, top, components
        )
    return node


def _component_schema(
    registry: str,
    section: Any,
    key: str,
    default_name: str | None,
    layers: list[tuple[str, DictConfig]],
    top: str,
    components: list[tuple[str, str]] | None,
) -> DictConfig:
    """The structured node of one component section ``key`` (``{name: ..., **its Config}``) of ``registry``."""
    if not isinstance(section, DictConfig):
        src = _source_of(layers, key, top)
        raise ConfigError(f"{src}: '{key}' must be a mapping with a `name:` key, got {section!r}")
    comp_name = section.get("name", default_name)
    if comp_name is None:
        choices = ", ".join(sorted(REGISTRIES[registry]))
        raise ConfigError(f"{_source_of(layers, key, top)}: missing required value '{key}.name' (one of: {choices})")
    try:
        comp = resolve(registry, str(comp_name))
    except KeyError as e:
        src = _source_of(layers, f"{key}.name", top)
        raise ConfigError(f"{src}: '{key}.name': {e.args[0]}") from None
    conf_cls = comp if dataclasses.is_dataclass(comp) else getattr(comp, "Config", None)
    if conf_cls is None or not dataclasses.is_dataclass(conf_cls):
        raise ConfigError(f"component {comp_name!r} of registry {registry!r} has no `Config` dataclass")
    if components is not None:
        components.append((key, registry))
    node = _build_schema(conf_cls, section, key + ".", layers, top, components)
    node["name"] = str(comp_name)
    return node


def _has_component_fields(cls: type) -> bool:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("registry") is not None:
            return True
        ftype = hints.get(f.name)
        if dataclasses.is_dataclass(ftype) and _has_component_fields(ftype):
            return True
    return False


def _config_fields(registry: str, name: str) -> set[str] | None:
    try:
        comp = resolve(registry, name)
    except KeyError:
        return None
    conf = comp if dataclasses.is_dataclass(comp) else getattr(comp, "Config", None)
    return {f.name for f in dataclasses.fields(conf)} if conf is not None and dataclasses.is_dataclass(conf) else None


def _drop_replaced_components(layers: list[tuple[str, DictConfig]], components: list[tuple[str, str]]) -> None:
    """A layer that switches a component section to another ``name:`` drops, from earlier layers, the settings that
    belong to the previous component only.

    So a derived experiment can inherit a full one and swap, say, an HTTP critic for a rule critic, or DiffusionNFT
    for Flow-GRPO, keeping the settings both share. Keys that belong to neither stay, and are reported as unknown.
    """
    for key, registry in components:
        current = None
        for j, (_, layer) in enumerate(layers):
            name = _select(layer, f"{key}.name")
            if name is not None and current is not None and str(name) != current:
                old_fields = _config_fields(registry, current) or set()
                new_fields = _config_fields(registry, str(name)) or set()
                stale = old_fields - new_fields
                for _, earlier in layers[:j]:
                    section = _select(earlier, key)
                    if isinstance(section, DictConfig):
                        for k in [k for k in section if k in stale]:
                            del section[k]
            if name is not None:
                current = str(name)


def import_extensions(imports: Any, source: str) -> None:
    for item in list(imports or []):
        item = str(item)
        try:
            if item.endswith(".py"):
                path = Path(item).resolve()
                mod_name = f"firm_ext_{path.stem}_{abs(hash(str(path))) % 10**8}"
                if mod_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(mod_name, path)
                if spec is None or spec.loader is None or not path.is_file():
                    raise FileNotFoundError(path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except Exception as e:  # noqa: BLE001 - re-raised with the source named
            raise ConfigError(f"{source}: cannot import {item!r} listed in `imports:`: {type(e).__name__}: {e}") from e


def _format_omegaconf_error(e: OmegaConfBaseException, source: str) -> str:
    key = getattr(e, "full_key", None) or "?"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ConfigKeyError):
        return f"{source}: unknown key '{key}' ({first})"
    return f"{source}: invalid value for '{key}': {first}"


def load_config(
    experiment: str | Path | None,
    overrides: list[str] | None = None,
    *,
    schema: type = ExperimentConfig,
    flags: dict[str, Any] | None = None,
    flags_source: str = "command-line flags",
) -> DictConfig:
    """Resolve a config of any command: dataclass defaults <- YAML chain <- ``flags`` <- overrides.

    The one loader of `firm run` (``schema=ExperimentConfig``), `firm curate`, `firm critic bench` and `firm eval`:
    every command finds, inherits, types, checks and reports its config the same way.

    Args:
        experiment: the YAML, a path or the name of a shipped experiment (:func:`firm.paths.find_experiment`);
            None for a config given on the command line only (`firm critic bench --data DIR --critic NAME`).
        overrides: ``key.sub=value`` overrides (values are YAML), merged last.
        schema: the top-level dataclass.
        flags: values from a command's own options (``{"data": ..., "critics": {...}}``); each top-level key given
            replaces that section of the YAML chain instead of merging into it.
        flags_source: what to call ``flags`` in error messages.

    Returns:
        A validated, structured ``DictConfig`` with interpolations (``${shipped:...}``) resolved. Use
        :func:`to_object` for the dataclass instances and :func:`to_yaml` to print it (``--dry-run``).

    Raises:
        ConfigError: naming the key and the file (or flag, or override) that set it, on any problem: a missing
            file, a YAML syntax error, an unknown key (with the closest known one), a wrong type, a missing value,
            an unknown component name, a value out of range (the dataclasses' ``validate()``).
    """
    layers: list[tuple[str, DictConfig]] = []
    if experiment is not None:
        path = _experiment_path(experiment)
        layers += load_yaml_chain(path)
        top = str(_display_path(path.resolve()))
    else:
        top = flags_source if flags else "command line"
    if flags:
        for _, layer in layers:
            for key in flags:
                layer.pop(key, None)
        try:
            layers.append((flags_source, OmegaConf.create(dict(flags))))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{flags_source}: {e}") from None
    layers += parse_overrides(list(overrides or []))
    try:
        raw = OmegaConf.merge(*[layer for _, layer in layers]) if layers else OmegaConf.create({})
    except OmegaConfBaseException as e:
        raise ConfigError(f"{top}: {e}") from None
    import_extensions(raw.get("imports"), _source_of(layers, "imports", top))
    components: list[tuple[str, str]] = []
    cfg = _build_schema(schema, raw, "", layers, top, components)
    _drop_replaced_components(layers, components)
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(_format_omegaconf_error(e, source)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        names = ", ".join(f"'{m}'" for m in missing)
        raise ConfigError(f"{top}: missing required value(s) {names}: set them in the YAML or as key=value")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e, top)) from None
    validate_config(_checked_object(cfg, layers, top), layers=layers, source=top)
    return cfg


def load_experiment(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    schema: type = ExperimentConfig,
) -> DictConfig:
    """A `firm run` experiment (or another ``schema``): :func:`load_config` without command-line flags."""
    return load_config(path, overrides, schema=schema)


def _experiment_path(experiment: str | Path) -> Path:
    """The YAML file of ``experiment`` (a path, or a shipped experiment's name); a ConfigError when there is none."""
    spec = str(experiment)
    try:
        path = Path(find_experiment(spec))
    except FileNotFoundError:  # a broken install without experiments/: the path as given
        path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"experiment file not found: {spec} is a folder (give a YAML file in it)")
    hint = ""
    if not Path(spec).is_absolute():
        try:
            root = experiments_root()
            names = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
        except (FileNotFoundError, OSError):
            names = []
        name = spec.removeprefix("experiments/").removesuffix(".yaml").removesuffix(".yml")
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = " (no such file, nor a shipped experiment of that name; "
        hint += f"did you mean {', '.join(repr(c) for c in close)}?)" if close else "`firm list` shows them)"
    raise ConfigError(f"experiment file not found: {spec}{hint}")


def build_component(registry: str, config: Any, *, source: str | None = None) -> tuple[type, Any]:
    """``(class, its Config instance)`` for a component of ``registry`` given in code rather than in a YAML file.

    ``config`` is the component's ``Config`` instance, a mapping (or DictConfig) with a ``name:`` key, or just the
    name. A mapping is validated exactly as the same section of an experiment YAML would be (the component's
    ``Config`` becomes the schema of a structured merge), so unknown keys, wrong types and missing values raise the
    same :class:`ConfigError` messages.

    Example: ``build_component("rewards", {"name": "cme", "w1": 0.7, "w2": 0.3})``.

    Args:
        registry: a key of :data:`firm.registry.REGISTRIES` (``critics``, ``rewards``, ``teachers``, ...).
        config: see above.
        source: what to call the config in error messages (default: ``<registry> component``).

    Raises:
        ConfigError: unknown name (with the known ones and the closest match), unknown key, wrong type, missing value.
    """
    where = source or f"{registry} component"
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        try:
            return resolve(registry, str(config.name)), config
        except KeyError as e:
            raise ConfigError(f"{where}: 'name': {e.args[0]}") from None
    if isinstance(config, str):
        config = {"name": config}
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, dict) or "name" not in config:
        raise ConfigError(f"{where}: expected a Config dataclass or a mapping with a `name:` key, got {config!r}")
    try:
        node = OmegaConf.create(config)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        comp = resolve(registry, str(node.name))
    except KeyError as e:
        raise ConfigError(f"{where}: 'name': {e.args[0]}") from None
    conf_cls = comp if dataclasses.is_dataclass(comp) else getattr(comp, "Config", None)
    if conf_cls is None or not dataclasses.is_dataclass(conf_cls):
        raise ConfigError(f"component {node.name!r} of registry {registry!r} has no `Config` dataclass")
    schema = _build_schema(conf_cls, node, "", [(where, node)], where)  # the same schema a YAML section gets
    schema.name = str(node.name)
    try:
        cfg = OmegaConf.merge(schema, node)
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e, where)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{where}: missing required value(s) {', '.join(repr(m) for m in missing)}")
    obj = _checked_object(cfg, [(where, node)], where)
    validate_config(obj, source=where)
    return comp, obj


def to_object(cfg: DictConfig) -> Any:
    """Dataclass instances (``ExperimentConfig`` with each component's ``Config``) from a resolved config."""
    return OmegaConf.to_object(cfg)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (it can be run again as it is)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


# --------------------------------------------------------------------------------------------------------------------
# Range checks: the validate() hook


def _problem(cls_or_obj: Any, prefix: str, e: ValueError) -> tuple[str, str]:
    """(dotted key, problem) of a ValueError raised for the dataclass at ``prefix`` (``"a.b."``)."""
    message = str(e)
    name, sep, rest = message.partition(":")
    names = {f.name for f in dataclasses.fields(cls_or_obj)} if dataclasses.is_dataclass(cls_or_obj) else set()
    name = name.strip()
    section = prefix.rstrip(".").rsplit(".", 1)[-1]
    if sep and section and name.startswith(section + "."):  # "generation.seeds: ..." raised by `generation`
        name = name[len(section) + 1 :]
    if sep and name in names:
        return prefix + name, rest.strip()
    return prefix.rstrip(".") or "<top level>", message


def _raise_invalid(key: str, problem: str, layers: list[tuple[str, DictConfig]] | None, source: str) -> None:
    src = _source_of(layers, key, source) if layers else source
    raise ConfigError(f"{src}: invalid value for '{key}': {problem}")


def validate_config(
    obj: Any, prefix: str = "", *, layers: list[tuple[str, DictConfig]] | None = None, source: str = "config"
) -> None:
    """Call ``validate()`` on every config dataclass in ``obj`` (nested ones first; inside lists and dicts too).

    Raises:
        ConfigError: ``"<file>: invalid value for '<key>': <problem>"``, the file being the layer that set the key
            (when ``layers`` are given) or ``source``.
    """
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            validate_config(v, f"{prefix}{i}.", layers=layers, source=source)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            validate_config(v, f"{prefix}{k}.", layers=layers, source=source)
        return
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for f in dataclasses.fields(obj):
        validate_config(getattr(obj, f.name), f"{prefix}{f.name}.", layers=layers, source=source)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            _raise_invalid(*_problem(obj, prefix, e), layers, source)


def _checked_object(cfg: DictConfig, layers: list[tuple[str, DictConfig]] | None, source: str) -> Any:
    """``OmegaConf.to_object(cfg)``, with a ValueError raised by some dataclass's ``__post_init__`` turned into a
    :class:`ConfigError` naming the innermost section that raises it."""
    try:
        return OmegaConf.to_object(cfg)
    except ValueError as e:
        err = e
    # find the innermost structured section that fails on its own, to name its key
    found: tuple[str, ValueError, type] | None = None

    def visit(node: Any, prefix: str) -> None:
        nonlocal found
        if found is not None or not isinstance(node, DictConfig):
            return
        for k in node:
            visit(node._get_node(k), f"{prefix}{k}.")
        if found is None and prefix and OmegaConf.get_type(node) not in (dict, None):
            try:
                OmegaConf.to_object(node)
            except ValueError as sub:
                found = (prefix, sub, OmegaConf.get_type(node))

    visit(cfg, "")
    if found is not None:
        prefix, sub, cls = found
        _raise_invalid(*_problem(cls, prefix, sub), layers, source)
    _raise_invalid("<top level>", str(err), None, source)
