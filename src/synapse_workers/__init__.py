"""synapse-workers: Synapse with workers, an internal nginx and the rest, from environment variables."""

__version__ = "0.2.0"
