"""Apps on top of a model: skills, RAG, agents, evaluation. They reach a model only through
`sorai.apps.client.Client` (the OpenAI protocol), so they run against any compatible endpoint."""
