"""synthd-train: turns a folder of sounds into a small causal VAE and exports it as a model file."""

__version__ = "0.1.0"
