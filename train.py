"""Train an AudioSet tagger on log-mel shards: ``python train.py --help``.

A thin entry point at the place the project's layout names, for ``accelerate launch train.py``;
the command is :mod:`audioset_dcls.training.cli` (installed as ``audioset-dcls train``).
"""

import sys

from audioset_dcls.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
