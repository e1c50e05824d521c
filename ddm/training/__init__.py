"""Island training: one expert per island (an ordinary accelerate job), checkpoints with exact resume, modalities."""
