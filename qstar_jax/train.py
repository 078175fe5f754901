"""`python -m qstar_jax.train`: trains Quiet-STaR, an LM or the NTP stage from a config file.

The code is in qstar_jax/training/trainer.py; this module only hands over to it.
"""

from absl import app

from qstar_jax.training.cli import main, parse_flags

if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
