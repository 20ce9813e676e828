"""Build log-mel WebDataset shards: ``python -m preprocessing.build_shards --help``.

A thin entry point kept at the place the project's layout names; the command is
:mod:`audioset_dcls.shards.cli` (installed as ``audioset-dcls build-shards``).
"""

import sys

from audioset_dcls.shards.cli import main

if __name__ == "__main__":
    sys.exit(main())
