"""`python -m qstar_jax.toy_reasoning`: writes toy reasoning problems (qstar_jax/toy/reasoning.py)."""

from qstar_jax.toy.reasoning import main

if __name__ == "__main__":
    main()
