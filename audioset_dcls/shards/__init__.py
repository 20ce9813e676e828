"""Log-mel WebDataset shards: the sample format (``format``) and the builder that writes them.

The command line is ``audioset_dcls.shards.cli`` (``audioset-dcls build-shards``,
``python -m preprocessing.build_shards`` in a checkout).

    from audioset_dcls.shards.build import BuildOptions, build_shards, format_summary
    result = build_shards(BuildOptions(segments=(csv,), labels=labels_csv, audio_dir=audio,
                                       out=out, split="train"))
    print(format_summary(result))

Output, in ``out`` (one split per folder):

- ``<split>-NNNNNN.tar``: WebDataset shards; each sample is the (128, 1001) log-mel in dB, not
  normalised, as ``<ytid>_<start_ms>.logmel.u8.zst`` (``encoding="uint8"``, the default: 0.625 dB
  steps, zstd, ~75 kB) or ``.logmel.npy`` (``"float16"``, ~256 kB), + ``.json`` (ytid, start, end,
  labels, source, duration): see ``audioset_dcls.shards.format``.
- ``sizes.json`` (shard name -> sample count) and ``manifest.json`` (feature config, encoding,
  labels, per-shard count/bytes/sha256, feature mean/std, clip-id hash, values clipped by the
  encoding, every skipped clip and why).
- ``skipped.csv``: the skipped clips, one per line, for people.
- ``_build/``: the plan and one small record per finished shard; what resuming and merging read.

How clips become shards (deterministic, so resuming and ``part`` are safe): the clips of the
inputs (duplicates removed) are shuffled with ``seed`` (the clips of one parquet row group stay
together, so that a worker reads each group once); shard ``i`` holds positions
``[i * shard_size, (i + 1) * shard_size)`` of that order, minus the clips that turned out to be
missing or broken. A shard's content therefore depends only on the inputs and the settings, never
on which other shards exist (a slot whose clips are all bad gets no tar, so numbers can have
gaps: use the manifest or ``sizes.json``, not a brace range). Each shard is written to
``<name>.tmp`` and renamed when complete, then its record is written to ``_build/``; a shard
counts as finished when its record exists and the tar's size and sha256 match it. Running the
same build again skips finished shards (verified) and rebuilds the rest, so a killed run loses at
most the shards in progress.

``part=(i, N)`` (0 <= i < N) builds only shards ``[i*K//N, (i+1)*K//N)`` of the K shards: N jobs
build disjoint ranges that together are exactly the single-run shard set. Jobs may share ``out``;
the job that completes the set writes the manifest. Jobs with separate output folders: copy all
tars and ``_build/`` records into one folder (names never collide) and call ``merge_shards``.

The modules, in the order data flows through them (``format`` is the sample format they all share):

- ``sources``: the inputs (segment CSVs + a folder, AudioSet containers: HDF5, parquet, audio
  WebDataset tars, or your own lists) -> the clips (label set, clips in input order, rows left
  out) and where each clip's audio is (an ``audio.containers.ClipRef``: a file, a cut, a
  container row);
- ``plan``: the options, the seeded order, shard slots and ``--part`` ranges, ``_build/plan.json``;
- ``worker``: one clip -> an encoded sample or a skip, in a pool of worker processes (which open
  containers lazily: one handle per worker and file);
- ``writer``: samples -> tars (one writer process), per-shard records and their verification;
- ``manifest``: records -> ``manifest.json``, ``sizes.json``, ``skipped.csv``; merging parts;
- ``build``: one run from the options to the summary.
"""
