"""chatgate: a self-hosted streaming chat gateway."""

__version__ = "0.1.0"
