"""finetune() and the Trainer pieces it runs with: datasets per stage, losses, checkpoints, progress, run record."""
