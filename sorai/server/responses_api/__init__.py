"""OpenAI's Responses API (POST /v1/responses and the stored responses behind it).

items.py turns input items into chat messages and answers into output items, store.py keeps
stored responses in SQLite, routes.py serves them over the chat machinery (server/chat.py's
renderer, tools and guided decoding).
"""
