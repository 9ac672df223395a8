class MoaSearchError(Exception):
    """One-line user-facing error."""


def finite_float(raw: str, what: str) -> float:
    """``float(raw)``; one-line MoaSearchError "<what> must be a number / finite, got <raw>"."""
    import math  # noqa: PLC0415

    try:
        value = float(raw)
    except ValueError:
        raise MoaSearchError(f"{what} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise MoaSearchError(f"{what} must be finite, got {raw!r}")
    return value
