"""modelhost: a self-hosted model-management and inference server."""

__version__ = "0.1.0"
