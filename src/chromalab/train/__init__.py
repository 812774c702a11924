"""Training: the models, their losses and optimizers, the input on both backends, checkpoints, and the train stage."""
