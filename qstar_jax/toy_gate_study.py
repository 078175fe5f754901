"""`python -m qstar_jax.toy_gate_study`: the think-gate study: thinking share against accuracy, NLL and speed.

The code is in qstar_jax/toy/gate_study.py; this module only hands over to it.
"""

from qstar_jax.toy.gate_study import main

if __name__ == "__main__":
    main()
