"""`python -m qstar_jax.analyze`: where thoughts help: per-token gains of a checkpoint on a text (qstar_jax/inference/analyze.py)."""

from qstar_jax.inference.analyze import main

if __name__ == "__main__":
    main()
