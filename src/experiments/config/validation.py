"""The composed config as typed settings: the schema's checks run here, and a required key
left unset is reported with how to set it. `experiments.run` calls it before anything heavy is
loaded, and `orchestration.launch` again on the config a resume or a worker's role leaves."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from experiments.config.schema import Config
from experiments.errors import ConfigError

# How to set the keys a preset leaves required (???), said when one is missing.
REQUIRED_HINTS = {
    "data.root": " - the folder with one subfolder per class, e.g. data.root=/path/to/images "
                 "(experiment=quickstart runs on built-in demo data)",
    "data.sources.second.root": " - experiment=transfer_multisource trains on a second "
                                "labeled folder too, e.g. data.sources.second.root="
                                "/path/to/other_lab (the same class subfolders)",
}


def validated(cfg: DictConfig) -> Config:
    """The typed settings (the schema's checks run here); a required key left unset is a
    user's error, reported with the key and how to set it."""
    try:
        settings = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        key = error.full_key
        hint = REQUIRED_HINTS.get(str(key), "")
        raise ConfigError(f"`{key}` must be set{hint}. Received: {key}=???") from error
    if not isinstance(settings, Config):
        raise TypeError(f"The composed config is not a Config. Received: {type(settings)!r}")
    return settings
