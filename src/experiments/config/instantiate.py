"""From the Hydra config to the factories a training needs: callbacks, the optimizer and the
augmenter are instantiated here (`hydra.utils.instantiate`, `_convert_="all"`), with the
config as recorded (resolved YAML and flat params).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import hydra
import keras
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Components:
    """Factories for the objects a training instantiates from config, fresh each time (a
    cross-validation builds one set per fold), and the config as it is recorded."""

    callbacks: Callable[[], list[keras.callbacks.Callback]]
    # (learning_rate: float or schedule, **optimizer options) -> a new optimizer
    optimizer: Callable[..., keras.optimizers.Optimizer]
    augmentation: Callable[[int], Any]  # seed -> augmenter
    config_yaml: str  # the resolved config (what resume restores)
    params: dict[str, Any]  # every key flattened, and the option each group took


def instantiate_callbacks(callbacks_cfg: DictConfig) -> list[keras.callbacks.Callback]:
    """Every non-null entry of the `callbacks` group, in config order."""
    return [hydra.utils.instantiate(node, _convert_="all")
            for node in callbacks_cfg.values() if node is not None]


def instantiate_optimizer(optimizer_cfg: DictConfig, **options: Any
                          ) -> keras.optimizers.Optimizer:
    """The configured Keras optimizer; `options` (a learning-rate schedule, EMA, gradient
    accumulation) replace or add to the configured keys."""
    # A partial, so a schedule object can replace the (typed, float) configured rate.
    return hydra.utils.instantiate(optimizer_cfg, _convert_="all", _partial_=True)(**options)


def instantiate_augmentation(augmentation_cfg: DictConfig, seed: int) -> Any:
    """The configured augmenter, seeded with `seed` when it takes one."""
    overrides = {"seed": seed} if "seed" in augmentation_cfg else {}
    return hydra.utils.instantiate(augmentation_cfg, _convert_="all", **overrides)


def components(cfg: DictConfig) -> Components:
    """Factories for what a training instantiates from config, and the config as recorded:
    resolved YAML (what resume restores) and every key as a param, with the option each group
    took (choice.augmentation, ...)."""
    params = flatten(plain(cfg))
    if HydraConfig.initialized():
        params.update({f"choice.{group}": str(option) for group, option
                       in HydraConfig.get().runtime.choices.items()
                       if not group.startswith("hydra")})
    return Components(functools.partial(instantiate_callbacks, cfg.callbacks),
                      functools.partial(instantiate_optimizer, cfg.optimizer),
                      functools.partial(instantiate_augmentation, cfg.augmentation),
                      OmegaConf.to_yaml(cfg, resolve=True), params)


def plain(cfg: DictConfig, resolve: bool = True) -> dict[str, Any]:
    """The config as plain Python containers (a mapping at the top)."""
    container = OmegaConf.to_container(cfg, resolve=resolve)
    if not isinstance(container, dict):
        raise TypeError(f"Expected a mapping config. Received: {type(container).__name__}")
    return {str(k): v for k, v in container.items()}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None become strings."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
