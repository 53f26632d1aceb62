"""Skills: classify, extract, summarize, sentiment (and, with embeddings, topics and ask), each a
Python function over `sorai.apps.client.Client` and a `sorai <verb>`."""
