"""Audio in: files and streams -> mono float32 waveforms at the front end's sample rate.

``decode`` reads whole files or in-memory files (any format libsndfile or ffmpeg reads) and
resamples; ``containers`` says where a clip's audio is (a file, a cut of one, a row of a PANNs
HDF5 file, of a Hugging Face parquet file, a member of an audio WebDataset tar) and reads it;
``stream`` reads long files and live PCM block by block. :mod:`audioset_dcls.features` turns the
waveforms into log-mels.
"""

from .containers import ClipRef, read_clip, read_clip_mono
from .decode import (
    AudioDecodeError,
    decode_audio,
    decode_mono,
    downmix,
    error_line,
    load_audio,
    resample,
    to_mono_resampled,
)
from .stream import stream_audio, stream_pcm

__all__ = ["ClipRef", "read_clip", "read_clip_mono", "AudioDecodeError", "decode_audio", "decode_mono", "downmix",
           "error_line", "load_audio", "resample", "stream_audio", "stream_pcm", "to_mono_resampled"]
