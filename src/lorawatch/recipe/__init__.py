"""The protocol as a recipe: training, the live monitor, strategies, and adapters trained elsewhere."""
