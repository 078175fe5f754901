"""`python -m qstar_jax.evaluate`: zero-shot benchmark accuracy of a checkpoint, with or without thinking.

The code is in qstar_jax/inference/evaluate.py; this module only hands over to it.
"""

from qstar_jax.inference.evaluate import main

if __name__ == "__main__":
    main()
