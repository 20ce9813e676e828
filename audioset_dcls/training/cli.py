"""Train an AudioSet tagger on log-mel shards: the command line (``train.py``, ``audioset-dcls train``).

    accelerate launch [--multi_gpu --num_processes N] train.py --config configs/convnext_tiny_dcls.yaml \\
        data.train=/data/shards/train data.eval=/data/shards/eval [key=value ...] [--resume]

Exit status: 0 done (or stopped at train.max_steps); 75 stopped by a signal with a checkpoint
(train.checkpoint_on_signal: resume with --resume); 2 one error line (config, data,
checkpoint, a run directory that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioset-dcls train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file overriding the defaults (configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint (train.resume=auto)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=1e-3 data.batch_size=64")
    args = p.parse_args(argv)

    # Imported after parsing: `--help` answers without loading torch and accelerate.
    from ..config import ConfigError, load_config, to_yaml
    from ..data import DataError
    from ..hub.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per file saved is noise
    overrides = list(args.overrides) + (["train.resume=auto"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from ..preemption import EXIT_PREEMPTED, parse_stop_signals
    from .loop import train
    from .state import OutputError

    try:
        summary = train(cfg)
    except (DataError, ConfigError, CheckpointError, OutputError) as err:
        logging.getLogger("audioset_dcls.train").error(str(err))
        return 2
    if summary.get("stopped_by"):
        # The run is over: a launcher that sees another rank exit first signals this one; that
        # must not turn the documented status into a death by signal.
        for sig in parse_stop_signals(cfg.train.checkpoint_on_signal):
            signal.signal(sig, signal.SIG_IGN)
        return EXIT_PREEMPTED
    if summary.get("eval") is not None:
        print(json.dumps({"final_eval": summary["eval"], "checkpoint": summary["checkpoint"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
