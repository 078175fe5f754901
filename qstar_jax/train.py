"""`python -m qstar_jax.train`: trains from a config file (qstar_jax/training/trainer.py)."""

from qstar_jax.training import stop_signals

stop_signals.hold_early()  # first: the imports below take seconds (stop_signals.py says why)
from absl import app  # noqa: E402

from qstar_jax.training.cli import main, parse_flags  # noqa: E402

if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
