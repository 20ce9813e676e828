"""Audio in: files and streams -> mono float32 waveforms at the front end's sample rate.

``decode`` reads whole files (any format libsndfile or ffmpeg reads) and resamples;
``stream`` reads long files and live PCM block by block. :mod:`audioset_dcls.features` turns the
waveforms into log-mels.
"""

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

__all__ = ["AudioDecodeError", "decode_audio", "decode_mono", "downmix", "error_line", "load_audio", "resample",
           "stream_audio", "stream_pcm", "to_mono_resampled"]
