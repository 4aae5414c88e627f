"""The HTTP front end: an OpenAI-compatible API in front of the engine.

`app.create_app` builds the FastAPI app. `chat` serves POST /v1/chat/completions with
`protocol` (request schema), `images` (data URL decoding) and `streaming` (SSE);
`errors` maps every failure to one OpenAI error object and `middleware` adds the
request id, the API key check and the body size limit.
"""
