"""A self-hosted, OffloadGPT-compatible offload relay for LLM chat requests."""

__version__ = "0.1.0"
