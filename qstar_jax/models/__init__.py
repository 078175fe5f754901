"""The LM: configuration, the Llama-family transformer, HF and GGUF weights, parameter sharding."""
