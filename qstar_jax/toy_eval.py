"""`python -m qstar_jax.toy_eval`: scores a checkpoint on toy reasoning problems (qstar_jax/toy/eval.py)."""

from qstar_jax.toy.eval import main

if __name__ == "__main__":
    main()
