"""What the trainer learns from: prompts, their text conditioning, and teacher samples."""
