"""audioset-dcls: AudioSet tagging with Dilated Convolution with Learnable Spacings.

Importing the package has no side effects; heavy modules load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "to_inference", "load_model", "load_pretrained", "Tagger", "FeatureConfig",
           "__version__"]


def __getattr__(name):  # lazy: `import audioset_dcls` stays cheap (no timm import)
    if name in ("create_model", "list_models", "to_inference", "param_groups"):
        from . import models

        return getattr(models, name)
    if name == "load_model":  # any checkpoint reference: a file, a finished run folder, a published name
        from .hub.references import load_reference

        return load_reference
    if name == "load_pretrained":
        from .hub.pretrained import load_pretrained

        return load_pretrained
    if name == "Tagger":
        from .tagging.tagger import Tagger

        return Tagger
    if name in ("FeatureConfig", "Normalization"):
        from . import features

        return getattr(features, name)
    raise AttributeError(f"module 'audioset_dcls' has no attribute {name!r}")
