"""Export: models into the MLflow registry (any model folder) and, to come, Hugging Face formats."""
