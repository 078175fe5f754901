"""`python -m qstar_jax.data`: converts a text corpus to parquet for training (qstar_jax/training/prepare_data.py)."""

from qstar_jax.training.prepare_data import main

if __name__ == "__main__":
    main()
