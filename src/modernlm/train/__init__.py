"""Training: the one Trainer loop, optimizers and schedules, losses, metrics tracking."""
