"""`python -m qstar_jax.generate`: text from a checkpoint, with or without thinking.

The code is in qstar_jax/inference/generate.py; this module only hands over to it.
"""

from qstar_jax.inference.generate import main

if __name__ == "__main__":
    main()
