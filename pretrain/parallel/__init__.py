"""Parallel strategies behind one interface; the trainer never branches on the strategy."""

from pretrain.parallel.base import Strategy
from pretrain.parallel.ddp import DDPStrategy
from pretrain.parallel.distributed import DistributedStrategy
from pretrain.parallel.fsdp import FSDPStrategy
from pretrain.parallel.single import SingleStrategy
from pretrain.parallel.zero import ZeroStrategy

# parallel.strategy -> its class (the schema validates the name).
STRATEGIES = {
    "single": SingleStrategy,
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "zero": ZeroStrategy,
}


def build_strategy(cfg) -> Strategy:
    """The strategy named by `parallel.strategy` (validated by the config schema)."""
    import os

    from pretrain.errors import ConfigError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel.strategy == "single" and world > 1:
        raise ConfigError(
            f"parallel.strategy=single runs one process, but {world} were started: "
            "set parallel.strategy=ddp, fsdp or zero"
        )
    return STRATEGIES[cfg.parallel.strategy](cfg)


__all__ = [
    "STRATEGIES",
    "DDPStrategy",
    "DistributedStrategy",
    "FSDPStrategy",
    "SingleStrategy",
    "Strategy",
    "ZeroStrategy",
    "build_strategy",
]
