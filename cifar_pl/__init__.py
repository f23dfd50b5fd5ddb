"""cifar-pl: config-driven CIFAR training with Lightning and Hydra."""
