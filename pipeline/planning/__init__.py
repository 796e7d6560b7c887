"""Memory planning: what a training run holds on each GPU, from the model's config.json alone."""
