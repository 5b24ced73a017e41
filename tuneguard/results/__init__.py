"""What a tune job leaves behind, read back: the MLflow schema (``schema``: tag and metric names,
query helpers), ``export`` (best configs as train files), ``report`` (figures and HTML page),
``ui`` (the MLflow UI and optuna-dashboard). Nothing heavy is imported here."""
