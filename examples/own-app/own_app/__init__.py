"""A minimal Flower app of its own, using resist-fl's ResIST with its own model and evaluation."""
