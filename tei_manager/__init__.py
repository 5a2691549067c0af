"""tei-manager: many text-embedding model servers behind one front door."""

__version__ = "0.1.0"
