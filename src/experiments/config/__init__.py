"""Configuration: the structured-config schemas Hydra validates at composition, the values each
key accepts, and the instantiation of config groups into the factories a training uses. The
bottom layer: it imports nothing else of the package."""
