"""Fine-tuning: JSONL data -> token ids + loss masks -> packed batches (data.py); later the device
mesh and parallelisms, the trainer loop, checkpoints and export. Builds on sorai.model; never
imports sorai.engine."""
