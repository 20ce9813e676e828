"""The authors' published AudioSet models: where each one's weights come from.

Like timm's pretrained configs, a table and nothing else: our model name, the file of Zenodo
record 8370979 (linked from the README of K-H-Ismail/DCLS-Audio, the authors' repository), the
reference model it holds and the AudioSet eval mAP the paper reports. :mod:`.pretrained` fetches
and caches them; :mod:`.convert_reference` converts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ZENODO_RECORD", "SOURCE", "PublishedModel", "PUBLISHED_MODELS", "DEFAULT_MODEL"]

ZENODO_RECORD = "8370979"
SOURCE = "Zenodo record 8370979, linked from the README of K-H-Ismail/DCLS-Audio (paper: arXiv:2309.13972)"


@dataclass(frozen=True)
class PublishedModel:
    """One published model: our name, where its weights come from, and what the paper reports."""

    name: str  # our model (audioset_dcls.models registry)
    file: str  # file name in the Zenodo record (and in any mirror)
    reference_model: str  # the reference code's model name (convert_reference.REFERENCE_MODELS)
    num_classes: int = 527

    @property
    def paper_map(self) -> str:
        """AudioSet eval mAP in the paper, mean ± std over its training runs (the registry's)."""
        # Imported here: the model registry imports timm (a second of start-up) that a look at
        # this table does not need.
        from ..models.registry import model_info

        return model_info(self.name).paper_map or "?"

    @property
    def url(self) -> str:
        return f"https://zenodo.org/records/{ZENODO_RECORD}/files/{self.file}?download=1"

    @property
    def cache_name(self) -> str:
        """The converter's output name for ``file`` (``convert_reference`` writes ``<stem>.safetensors``)."""
        return Path(self.file).stem + ".safetensors"


PUBLISHED_MODELS: dict[str, PublishedModel] = {
    m.name: m
    for m in (
        PublishedModel("convnext_tiny_dcls", "convnext_dcls_audio_tiny.pth", "convnext_dcls_audio_tiny"),
        PublishedModel("convformer_s18", "convformer_audio_s18.pth", "convformer_audio_s18"),
        PublishedModel("convformer_s18_dcls", "convformer_dcls_audio_s18.pth", "convformer_dcls_audio_s18"),
        PublishedModel("fastvit_sa24_dcls", "fastvit_dcls_audio_sa24.pth", "fastvit_dcls_audio_sa24"),
    )
}
DEFAULT_MODEL = "convnext_tiny_dcls"  # the paper's best published model
