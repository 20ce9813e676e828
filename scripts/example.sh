#!/usr/bin/env bash
# The built-in example, end to end on the CPU, no downloads:
#   synthetic AudioSet-format data -> log-mel shards -> train the tiny model -> mAP -> tag files.
# Usage: bash scripts/example.sh [OUT_DIR]   (default: example_run/)
# Uses $PYTHON (default: python); scripts/quickstart.sh sets it to the project's .venv.
# EXAMPLE_TRAIN / EXAMPLE_EVAL / EXAMPLE_EPOCHS shrink the run (the test suite uses them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-example_run}
PY=${PYTHON:-python}
TRAIN_CLIPS=${EXAMPLE_TRAIN:-320}
EVAL_CLIPS=${EXAMPLE_EVAL:-96}
EPOCHS=${EXAMPLE_EPOCHS:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "1/5  Write a mini AudioSet (8 synthetic sound classes, mixed formats, 3 broken clips)"
run "$PY" -m audioset_dcls.synthetic --out "$OUT/audioset" --train "$TRAIN_CLIPS" --eval "$EVAL_CLIPS"

step "2/5  Build log-mel WebDataset shards (train: resumable, shuffled; eval: ordered)"
run "$PY" -m preprocessing.build_shards --split train \
  --segments "$OUT/audioset/balanced_train_segments.csv" --labels "$OUT/audioset/class_labels_indices.csv" \
  --audio-dir "$OUT/audioset/audio/train" --out "$OUT/shards/train" --shard-size 64 --workers 2
run "$PY" -m preprocessing.build_shards --split eval \
  --segments "$OUT/audioset/eval_segments.csv" --labels "$OUT/audioset/class_labels_indices.csv" \
  --audio-dir "$OUT/audioset/audio/eval" --out "$OUT/shards/eval" --shard-size 64 --workers 2

step "3/5  Train the tiny DCLS model on the CPU (a few minutes), evaluating mAP"
run "$PY" train.py --config configs/tiny.yaml \
  model.name=convnext_atto_dcls schedule.epochs="$EPOCHS" data.train="$OUT/shards/train" data.eval="$OUT/shards/eval" train.output_dir="$OUT/run" train.progress_bar=false

step "4/5  Tag two eval clips with the trained checkpoint (their true labels follow)"
clip_a=$(find "$OUT/audioset/audio/eval" -name '*.flac' | sort | head -n 1)
clip_b=$(find "$OUT/audioset/audio/eval" -name '*.ogg' | sort | head -n 1)
run "$PY" infer.py --checkpoint "$OUT/run/model.safetensors" --top-k 3 "$clip_a" "$clip_b"
for clip in "$clip_a" "$clip_b"; do
  # file name -> YouTube-style id: drop the extension, a leading Y on 12-char names, any _start suffix
  id=$(basename "$clip"); id=${id%%.*}
  if [ ${#id} -ge 12 ] && [ "${id:0:1}" = Y ]; then id=${id:1}; fi
  id=${id:0:11}
  echo "true labels of $(basename "$clip"): $(grep -F -- "$id," "$OUT/audioset/eval_segments.csv" | cut -d'"' -f2)"
done

step "5/5  Tag the whole eval folder to CSV"
run "$PY" infer.py --checkpoint "$OUT/run/model.safetensors" --format csv --top-k 3 \
  --output "$OUT/eval_tags.csv" "$OUT/audioset/audio/eval"

cat <<SUMMARY

Done. Where everything went:
  data        $OUT/audioset          (CSV files + audio, AudioSet layout)
  shards      $OUT/shards/{train,eval}  (tars, sizes.json, manifest.json, skipped clips report)
  run         $OUT/run                (config, logs, TensorBoard, eval results, checkpoints)
  checkpoint  $OUT/run/model.safetensors  (self-describing: python infer.py --checkpoint ... FILE)
  tags        $OUT/eval_tags.csv
SUMMARY
