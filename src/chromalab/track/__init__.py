"""MLflow: where runs are stored, what each run records, the dataset inputs, the model registry."""
