"""`python -m qstar_jax.evaluate`: zero-shot benchmark accuracy of a checkpoint, with or without thinking (qstar_jax/inference/evaluate.py)."""

from qstar_jax.inference.evaluate import main

if __name__ == "__main__":
    main()
