"""adtr: Anomaly Detection Transformer (You et al., 2022), reference implementation."""

__version__ = "0.1.0"

__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str):
    """``adtr.Detector`` and ``adtr.Prediction``, imported on first use: ``import adtr`` (and the
    CLI's start, before it can catch Ctrl-C) then does not wait for torch."""
    if name in ("Detector", "Prediction"):
        from adtr import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'adtr' has no attribute {name!r}")
