"""keel: training-dynamics techniques for PyTorch, as small composable units and a lean trainer."""

from keel.errors import KeelError

__version__ = "0.1.0"
__all__ = ["KeelError", "__version__"]
