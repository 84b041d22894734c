"""The composed config as typed settings: the schema's checks run here, and a required key
left unset is reported with how to set it. `experiments.run` calls it before anything heavy is
loaded, and `orchestration.launch` again on the config a resume or a worker's role leaves."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from experiments.config.locations import require_folder, require_weights_file
from experiments.config.schema import Config, DemoDataConfig
from experiments.errors import ConfigError

# Backbones whose `weights` is their own location (backbone.preset / backbone.path), checked
# by their loaders with messages of their own.
SELF_LOCATED_BACKBONES = ("keras_hub", "keras_file")

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


def named_folders(settings: Config) -> list[tuple[str, str]]:
    """(config key, folder) of every labeled folder the run reads: data.root (unless it is
    the demo set, generated on first use), data.test_root, each data.sources and
    eval.external folder."""
    data = settings.data
    folders = [] if isinstance(data, DemoDataConfig) else [("data.root", data.root)]
    if data.test_root is not None:
        folders.append(("data.test_root", data.test_root))
    folders += [(f"data.sources.{s.name}.root", s.root) for s in data.source_folders]
    folders += [(f"eval.external.{c.name}.root", c.root) for c in settings.eval.cohorts]
    return folders


def check_locations(settings: Config) -> None:
    """Every folder and weights file the settings name exists (MissingFileError naming the
    key otherwise): asked before the training stack loads, so a mistyped path costs half a
    second, not six."""
    for key, folder in named_folders(settings):
        require_folder(folder, key)
    backbone = settings.backbone
    if backbone.name not in SELF_LOCATED_BACKBONES and backbone.weights not in (None, "imagenet"):
        require_weights_file(backbone.weights)
