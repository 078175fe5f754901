"""`python -m qstar_jax.convert`: model weights between HF safetensors, GGUF and our model directories (qstar_jax/models/convert.py)."""

from qstar_jax.models.convert import main

if __name__ == "__main__":
    main()
