"""``audioset-dcls COMMAND [options]`` (also ``python -m audioset_dcls COMMAND``): every command of
the project, so that an installed package is usable without the repository.

Each command is a module's ``main(argv)``, imported only when it runs (``audioset-dcls --help``
loads no torch). ``audioset-dcls COMMAND --help`` shows its options.
"""

from __future__ import annotations

import importlib
import sys

from . import __version__

# command -> (module with main(argv), what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "tag": ("audioset_dcls.tagging.cli", "tag audio files, folders or live PCM (same as infer.py)"),
    "tag-archive": ("audioset_dcls.tagging.archive", "tag / embed a whole archive into parquet: many processes, resumable"),
    "train": ("audioset_dcls.training.cli", "train or fine-tune on log-mel shards (same as train.py)"),
    "crossval": ("audioset_dcls.training.crossval", "k-fold cross-validation (ESC-50 style) in one command, resumable"),
    "evaluate": ("audioset_dcls.training.evaluate", "mAP / AUC / d' of a checkpoint on eval shards; --calibrate"),
    "build-shards": ("audioset_dcls.shards.cli", "audio -> log-mel WebDataset shards (resumable, parallel)"),
    "export": ("audioset_dcls.tagging.export", "export a checkpoint to ONNX"),
    "pretrained": ("audioset_dcls.hub.pretrained", "list or fetch the published models into the cache"),
    "convert": ("audioset_dcls.hub.convert_reference", "convert a reference (DCLS-Audio) .pth checkpoint"),
    "example-data": ("audioset_dcls.synthetic", "write a small synthetic AudioSet-format dataset"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: audioset-dcls COMMAND [options]   (audioset-dcls COMMAND --help)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"audioset-dcls {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"audioset-dcls: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv[0] = f"audioset-dcls {name}"  # argparse's usage line names the command as typed
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
