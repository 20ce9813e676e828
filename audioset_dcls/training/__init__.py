"""Training: config -> Accelerator -> shards -> model -> loop -> checkpoints -> inference checkpoint.

``loop`` (the phases of a run), ``recipe`` (optimizer, schedule, loss, EMA), ``state`` (what a
run holds), ``checkpointing`` (save, resume, export), ``evaluate`` (the one evaluation, also a
command), ``finetune`` (``model.init``, linear probe) and ``cli`` (``train.py``).
"""
