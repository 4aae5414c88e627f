"""specvlm: an OpenAI-compatible VLM server with lossless speculative decoding."""

__version__ = "0.1.0"
