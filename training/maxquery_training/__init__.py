"""MaxQuery training: data, augmentation, losses, the two-stage recipe, evaluation."""
