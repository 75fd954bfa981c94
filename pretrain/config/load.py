"""Loading a config: defaults <- YAML <- dotted overrides, every key checked against the schema."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from pretrain.config.schema import Config, StreamConfig
from pretrain.errors import ConfigError

log = logging.getLogger(__name__)

# Keys renamed in the schema: (dataclass, old name) -> new name. Old configs and run
# directories keep loading; the old name is read as the new one, with a warning.
RENAMED: dict[tuple[type, str], str] = {(StreamConfig, "remote"): "path"}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML at `path` <- dotted `key=value` overrides, checked strictly."""
    layers = []
    if path is not None:
        layers.append((str(path), _load_yaml(Path(path))))
    if overrides:
        layers.append(("command line", _parse_overrides(overrides)))
    return _merge(layers)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with dotted `key=value` overrides applied, checked as load_config checks them."""
    base = OmegaConf.create(to_dict(cfg))
    return _merge([("config", base), ("command line", _parse_overrides(overrides))])


def _merge(layers: list[tuple[str, DictConfig]]) -> Config:
    merged = OmegaConf.structured(Config)
    for source, layer in layers:
        _check_keys(layer, Config, prefix="", source=source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(_omegaconf_message(e, source)) from None
    try:
        cfg: Config = OmegaConf.to_object(merged)  # resolves ${...} interpolations
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", "?")
        raise ConfigError(f"{key} is required: set it in the YAML or as {key}=...") from None
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e, "config")) from None
    from pretrain.config.checks import validate  # imports this module's schema

    validate(cfg)
    return cfg


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends, all user errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return node


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command line: {e}".splitlines()[0]) from None


def _check_keys(node: Any, schema: type, prefix: str, source: str, strict: bool = True) -> None:
    """Reject keys that are not in the schema, suggesting the closest valid key (`strict`),
    and read renamed keys under their new names."""
    if not isinstance(node, DictConfig):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in list(node):
        full = f"{prefix}{key}"
        if (schema, key) in RENAMED:
            key = _rename(node, key, RENAMED[schema, key], prefix, source)
        elif key not in fields:
            if not strict:
                continue
            raise ConfigError(f"{source}: unknown key '{full}'{_suggest(str(key), fields, prefix)}")
        sub = _dataclass_of(schema, key)
        if sub is None:
            continue
        value = node._get_node(key)
        if isinstance(value, ListConfig):
            for i, item in enumerate(value):
                _check_keys(item, sub, f"{prefix}{key}[{i}].", source, strict)
        else:
            _check_keys(value, sub, f"{prefix}{key}.", source, strict)


def _rename(node: DictConfig, old: str, new: str, prefix: str, source: str) -> str:
    if new in node:
        raise ConfigError(
            f"{source}: '{prefix}{old}' and '{prefix}{new}' both given: keep only {new}"
        )
    log.warning("%s: '%s%s' is deprecated: call it '%s%s'", source, prefix, old, prefix, new)
    with open_dict(node):
        node[new] = node.pop(old)
    return new


@functools.cache  # a saved config is checked key by key at every start, on every rank
def _dataclass_of(schema: type, key: str) -> type | None:
    """The dataclass a field holds (directly or as list items), if any."""
    default = OmegaConf.structured(schema)
    value = default._get_node(key)
    if isinstance(value, DictConfig):
        kind = OmegaConf.get_type(value)
        return kind if dataclasses.is_dataclass(kind) else None  # a free-form dict
    if isinstance(value, ListConfig):
        element = value._metadata.element_type
        return element if dataclasses.is_dataclass(element) else None
    return None


def _suggest(key: str, fields: dict, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f"; valid keys here: {', '.join(prefix + k for k in fields)}"


def _omegaconf_message(e: OmegaConfBaseException, source: str) -> str:
    key = getattr(e, "full_key", None)
    msg = getattr(e, "msg", None) or str(e)
    msg = msg.strip().splitlines()[0]
    return f"{source}: {key}: {msg}" if key else f"{source}: {msg}"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run directory's config.yaml)."""
    node = OmegaConf.create(data)
    _check_keys(node, Config, prefix="", source="saved config", strict=False)
    merged = OmegaConf.merge(OmegaConf.structured(Config), node)
    return OmegaConf.to_object(merged)
