"""Tag audio with a published model or your checkpoint: ``python infer.py --help``.

A thin entry point at the place the project's layout names; the command is
:mod:`audioset_dcls.tagging.cli` (installed as ``audioset-dcls tag``), the library
``audioset_dcls.Tagger``.
"""

import sys

from audioset_dcls.tagging.cli import main

if __name__ == "__main__":
    sys.exit(main())
