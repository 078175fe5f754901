"""`python -m qstar_jax.convert`: model weights between HF safetensors, GGUF and our model directories.

The code is in qstar_jax/models/convert.py; this module only hands over to it.
"""

from qstar_jax.models.convert import main

if __name__ == "__main__":
    main()
