"""FIRM: faithful image reward modeling and RL for image editing and text-to-image models."""

__version__ = "0.1.0"
