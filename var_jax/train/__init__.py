"""Training: optimizer recipe, train state and shardings, the VAR step, checkpoints, logging, the trainer loop."""
