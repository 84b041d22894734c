"""Training one model: build it from the config, fit it with selection on validation (callbacks,
EMA, per-epoch state that survives interruptions), fine-tuning strategies, linear probes on
frozen features, distribution strategies and the CPU/precision runtime."""
