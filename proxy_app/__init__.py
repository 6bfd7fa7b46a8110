"""OpenAI-compatible API gateway in front of vLLM."""
