"""The OpenAI-compatible HTTP server (`sorai serve`): FastAPI over the AsyncEngine.

app.py builds the app; protocol.py holds the request and response bodies; chat.py and
completions.py the two generation endpoints; routes.py the small ones; runner.py drives the
engine for one API request; auth.py, body.py, errors.py and metrics.py do one job each;
serve.py runs it all under uvicorn; models.py carries several models (`-m A -m B`), with
model_flags.py their serve flags.
"""
