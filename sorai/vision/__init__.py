"""Vision: safe image decoding, OCR (rapidocr's PP-OCR models on onnxruntime), the text rendering
that lets a text-only model read an image, and Set-of-Mark region marks.

Imports nothing above sorai.errors: the server, the apps and the CLI build on it.
"""
