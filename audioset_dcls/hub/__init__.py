"""Checkpoints and where they come from.

``checkpoint`` (self-describing inference checkpoints: weights + model, features, labels),
``references`` (what ``--checkpoint`` / ``model.init`` / ``train.resume`` may name, and the run
folder's layout), ``published`` (the authors' published models, a table), ``pretrained``
(download, convert and cache them), ``convert_reference`` (the reference code's checkpoints ->
ours).
"""
