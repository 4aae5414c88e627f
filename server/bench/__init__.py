"""`specvlm bench`: side-by-side speed of this engine and Hugging Face, and serving load.

Modules: `systems` (what is compared and how each decodes), `prompts`, `offline` (the
interleaved run), `load` (concurrent streaming clients), `memory`, `report` (JSON,
markdown and chart) and `cli`.
"""
