"""Offline inference on Kaggle: build the kernel and its datasets, run it, upload it.

The competition scores a notebook run with the internet off. What the notebook needs beyond the
Kaggle image travels as datasets: the code (wheels, installed with ``pip --no-index``) and the
trained models of the blend. These two lists are the contract with the Kaggle image; the local
rehearsal (``spinegrade kernel-run``) builds an environment holding exactly the first list plus what
the kernel installs from the second, so a missing dependency shows up here and not on Kaggle.
"""

# Assumed present on the Kaggle Python image (with their own dependencies).
KAGGLE_IMAGE_PACKAGES = (
    "torch", "torchvision", "numpy", "pandas", "scipy", "scikit-learn", "matplotlib", "PyYAML",
    "safetensors", "pillow", "opencv-python-headless", "albumentations", "huggingface_hub",
)

# Installed by the kernel from its code dataset: the project itself, packages whose version the
# saved models or the DICOM reader depend on (timm's architectures, pydicom 3's API), and the
# JPEG/RLE decoders the image lacks.
BUNDLED_PACKAGES = (
    "spinegrade", "pydicom", "timm", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
)

# Python versions of the Kaggle image that binary wheels are fetched for when the network allows.
KAGGLE_PYTHON_VERSIONS = ("3.10", "3.11", "3.12")

DEFAULT_NAME = "spinegrade-rsna-2024"  # the kernel; its datasets are <name>-code and <name>-models
MODELS_MARKER = "spinegrade-models.json"  # at the root of the models dataset
# What the kernel says of its run, in its working folder beside submission.csv: whether the whole
# prediction fell back on the prior, and which blended groups got no model row (``runtime``).
STATUS_FILE = "kernel_status.json"
