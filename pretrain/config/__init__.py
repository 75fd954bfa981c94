"""The run config: typed schema (`schema`), loading with overrides (`load`), value and
cross-key rules (`checks`), and the docs/config.md reference generated from the schema (`doc`)."""

from pretrain.config.load import from_dict, load_config, to_dict, to_yaml
from pretrain.config.schema import Config
from pretrain.errors import ConfigError

__all__ = ["Config", "ConfigError", "from_dict", "load_config", "to_dict", "to_yaml"]
