#!/usr/bin/env bash
# Container entry point: one sub-command per user journey; anything else is run as given.
#   build-shards ARGS  -> python -m preprocessing.build_shards ARGS
#   train ARGS         -> accelerate launch $ACCELERATE_ARGS train.py ARGS
#                         (ACCELERATE_ARGS e.g. "--multi_gpu --num_processes 8 --mixed_precision bf16")
#   tag ARGS           -> python infer.py ARGS
#   evaluate ARGS      -> accelerate launch $ACCELERATE_ARGS -m audioset_dcls.training.evaluate ARGS
#   convert ARGS       -> python -m audioset_dcls.hub.convert_reference ARGS
#   export ARGS        -> python -m audioset_dcls.tagging.export ARGS
#   example            -> the built-in example (synthetic data -> shards -> train -> tag) under /runs
set -euo pipefail
cd /opt/audioset-dcls
cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  build-shards) exec python -m preprocessing.build_shards "$@" ;;
  train)
    # ACCELERATE_ARGS is split on purpose: it holds several launcher flags.
    # shellcheck disable=SC2086
    exec accelerate launch ${ACCELERATE_ARGS:-} train.py "$@" ;;
  tag) exec python infer.py "$@" ;;
  evaluate)
    # shellcheck disable=SC2086
    exec accelerate launch ${ACCELERATE_ARGS:-} -m audioset_dcls.training.evaluate "$@" ;;
  convert) exec python -m audioset_dcls.hub.convert_reference "$@" ;;
  export) exec python -m audioset_dcls.tagging.export "$@" ;;
  example) exec bash scripts/example.sh "${1:-/runs/example}" ;;
  help|--help|-h)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) exec "$cmd" "$@" ;;
esac
