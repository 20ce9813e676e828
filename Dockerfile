# audioset-dcls on a CUDA PyTorch base: build shards, train with accelerate, tag audio.
#
#   docker build -t audioset-dcls .
#   docker run --rm audioset-dcls help
#
# The base image's own torch/torchvision (CUDA build) are kept: pyproject.toml only sets lower
# bounds, and constraints.txt (CPU CI pins) is deliberately not used here.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# ffmpeg decodes the m4a/opus files that many AudioSet downloaders produce (libsndfile reads
# wav/flac/ogg/mp3 itself); tini reaps accelerate's worker processes and forwards signals.
# DL3008: not pinned on purpose: Ubuntu drops superseded versions from its archive, so a pin
# breaks the build within weeks; these two tools have stable interfaces.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg tini \
    && rm -rf /var/lib/apt/lists/*

# Published models fetched by `tag` (infer.py without --checkpoint) are cached on the /runs
# volume, so they are downloaded once, not once per container.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    AUDIOSET_DCLS_CACHE=/runs/cache/audioset_dcls

WORKDIR /opt/audioset-dcls

# Dependencies first, so editing the code does not reinstall them. DL3013: "." is this project,
# whose dependency ranges live in pyproject.toml; pinning them here would fight the base image's torch.
COPY pyproject.toml README.md LICENSE ./
COPY audioset_dcls/__init__.py audioset_dcls/__init__.py
# hadolint ignore=DL3013
RUN pip install ".[export,containers]"

COPY audioset_dcls/ audioset_dcls/
COPY preprocessing/ preprocessing/
COPY configs/ configs/
COPY scripts/ scripts/
COPY train.py infer.py docker/entrypoint.sh ./
# hadolint ignore=DL3013
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 --shell /bin/bash dcls \
    && mkdir -p /data /runs \
    && chown dcls:dcls /data /runs

USER 1000:1000
VOLUME ["/data", "/runs"]
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/audioset-dcls/entrypoint.sh"]
CMD ["help"]
