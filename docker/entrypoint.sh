#!/usr/bin/env bash
# Container entry point: one sub-command per user journey; anything else is run as given.
#   train ARGS         -> accelerate launch $ACCELERATE_ARGS train.py ARGS
#                         (ACCELERATE_ARGS e.g. "--multi_gpu --num_processes 8 --mixed_precision bf16")
#   evaluate ARGS      -> accelerate launch $ACCELERATE_ARGS -m audioset_dcls evaluate ARGS
#   example            -> the built-in example (synthetic data -> shards -> train -> tag) under /runs
#   any other command of `audioset-dcls --help` (build-shards, tag, export, pretrained, ...) -> audioset-dcls it
set -euo pipefail
cd /opt/audioset-dcls
cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  train)
    # ACCELERATE_ARGS is split on purpose: it holds several launcher flags.
    # shellcheck disable=SC2086
    exec accelerate launch ${ACCELERATE_ARGS:-} train.py "$@" ;;
  evaluate)
    # shellcheck disable=SC2086
    exec accelerate launch ${ACCELERATE_ARGS:-} -m audioset_dcls evaluate "$@" ;;
  example) exec bash scripts/example.sh "${1:-/runs/example}" ;;
  help|--help|-h)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    audioset-dcls --help ;;
  *)
    # One of the package's commands, or anything else (bash, python, ...) as given.
    commands=$(audioset-dcls --help)
    if grep -q "^  $cmd " <<<"$commands"; then exec audioset-dcls "$cmd" "$@"; fi
    exec "$cmd" "$@" ;;
esac
