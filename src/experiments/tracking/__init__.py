"""Everything MLflow: the tracking store and its runs, what each run records, the logged and
registered model, the per-epoch logger, the sweep's parent run and the comparison report."""
