"""`python -m qstar_jax.toy_study`: the toy study: does thinking learn the working? (qstar_jax/toy/study.py)."""

from qstar_jax.toy.study import main

if __name__ == "__main__":
    main()
