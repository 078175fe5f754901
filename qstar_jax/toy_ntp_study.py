"""`python -m qstar_jax.toy_ntp_study`: the toy NTP study: what distillation keeps of the thinking gain.

The code is in qstar_jax/toy/ntp_study.py; this module only hands over to it.
"""

from qstar_jax.toy.ntp_study import main

if __name__ == "__main__":
    main()
