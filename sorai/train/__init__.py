"""Fine-tuning: JSONL data -> token ids + loss masks -> packed batches (data.py) -> the loop
(trainer.py) with its loss, optimizer, checkpoints and metrics; `sorai train` (command.py).
Whatever is applied to the model from outside (checkpointing, compile, and later the parallel
layouts) goes through parallelize.py. Builds on sorai.model; never imports sorai.engine."""
