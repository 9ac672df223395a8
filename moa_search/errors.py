class MoaSearchError(Exception):
    """One-line user-facing error."""
