"""Tag audio files with an audioset-dcls checkpoint. Thin wrapper; see ``python infer.py --help``
and ``audioset_dcls/tagging.py`` (the library: ``Tagger.from_checkpoint(...).tag(path_or_array)``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from audioset_dcls.tagging.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
