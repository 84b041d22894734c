"""The networks: the backbone registry (constructor, preprocessing, input sizes, weights), the
study's classifier head, fused BatchNorm, and the cache of frozen-backbone features."""
