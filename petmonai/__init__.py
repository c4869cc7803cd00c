"""petmonai: 3D deep learning on brain FDG-PET, built on MONAI."""

__version__ = "0.1.0"

CLASS_NAMES = ("NC", "MCI")
"""Label order: index 0 is NC (healthy), index 1 is MCI, the positive class."""
