"""Models: resolving a spec offline, the packaged-model cache, GGUF conversion."""
