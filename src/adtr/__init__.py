"""adtr: Anomaly Detection Transformer (You et al., 2022), reference implementation."""

__version__ = "0.1.0"

from adtr.detector import Detector, Prediction  # noqa: E402

__all__ = ["Detector", "Prediction", "__version__"]
