"""The published method's entry point, kept so its command runs unchanged:

    python train_models.py --models vit swin --batch_size 32 --num_epochs 30 --freeze_backbone False

It is `spinegrade train` with the same flags.
"""

import sys

from spinegrade.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
