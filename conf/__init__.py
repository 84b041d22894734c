"""The config files (YAML, one folder per config group), shipped inside the package so Hydra
finds them as pkg://experiments.conf wherever the package is installed."""
