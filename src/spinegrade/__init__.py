"""spinegrade: grade lumbar spinal stenosis on MRI in the RSNA 2024 layout."""

import os

# albumentations asks PyPI for a newer version on import; spinegrade never reaches the network
# at run time (Kaggle kernels run with the internet off, clusters often do too).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
