"""Evaluation (`sorai eval`): LLM-judged metrics (groundedness, relevance, coherence, fluency,
similarity, faithfulness) and computed ones (exact match, token F1, ROUGE-L, BLEU, embedding
similarity, classification, extraction, latency, tokens) over a dataset, a run directory with
rows, summary and an HTML report, and paired-bootstrap comparison of two runs."""
