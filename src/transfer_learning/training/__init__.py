"""The one training engine: the recipe, its data, losses, optimiser, trainer and checkpoints."""
