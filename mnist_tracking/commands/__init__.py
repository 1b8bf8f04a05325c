"""One module per MLproject entry point: each orchestrates its MLflow run and nothing else."""
