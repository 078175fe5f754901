"""`python -m qstar_jax.toy_ntp_study`: the toy NTP study: what distillation keeps of the thinking gain (qstar_jax/toy/ntp_study.py)."""

from qstar_jax.toy.ntp_study import main

if __name__ == "__main__":
    main()
