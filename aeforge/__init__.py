"""aeforge: autoencoder-family methods launched from Hydra YAML on Lightning."""

__version__ = "0.1.0"
