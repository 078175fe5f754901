"""`python -m qstar_jax.analyze`: where thoughts help: per-token gains of a checkpoint on a text.

The code is in qstar_jax/inference/analyze.py; this module only hands over to it.
"""

from qstar_jax.inference.analyze import main

if __name__ == "__main__":
    main()
