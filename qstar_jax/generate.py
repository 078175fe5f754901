"""`python -m qstar_jax.generate`: text from a checkpoint, with or without thinking (qstar_jax/inference/generate.py)."""

from qstar_jax.inference.generate import main

if __name__ == "__main__":
    main()
