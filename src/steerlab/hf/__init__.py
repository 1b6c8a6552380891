"""The Hugging Face engine: loading, layers, steering hooks, decoding, extraction, reference."""
