"""`python -m qstar_jax.smollm2_study`: SmolLM2-135M, Quiet-STaR against its controls on math (toy/smollm2_study.py)."""

from qstar_jax.toy.smollm2_study import main

if __name__ == "__main__":
    main()
