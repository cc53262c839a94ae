"""Training recipes, models, data and checkpointing for srigl-jax (run with `python -m train`)."""
