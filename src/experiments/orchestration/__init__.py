"""Putting it together: one training run, a cross-validation (folds, repeats, the pooled
out-of-fold results and the parent's model), a refit on all images, resuming a run."""
