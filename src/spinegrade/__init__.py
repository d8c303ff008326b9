"""spinegrade: grade lumbar spinal stenosis on MRI in the RSNA 2024 layout."""

__version__ = "0.1.0"
