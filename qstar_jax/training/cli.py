"""The command line of `python -m qstar_jax.train`: flags, and config mistakes in one line."""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.training.trainer import order_cpu_collectives, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)


_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and the trained model")


_PREFLIGHT = flags.DEFINE_bool("preflight", False, "compile the train step for the configured shapes "
                               "on abstract inputs, report per-device memory, and exit")


_TOPOLOGY = flags.DEFINE_string("topology", None, "with --preflight: compile for this TPU slice with the TPU "
                                "compiler (libtpu), e.g. v5e:8x8, v4:2x2x4 or an accelerator type like v4-32")


@exit_on_user_error
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    cfg = _CONFIG.value
    if cfg is None:
        raise UserError("--config experiments/NAME.py is required")
    if not _WORKDIR.value and not _PREFLIGHT.value:
        raise UserError("--workdir DIR is required")
    if _TOPOLOGY.value and not _PREFLIGHT.value:
        raise UserError("--topology compiles for a TPU slice this machine does not have; it needs --preflight")
    order_cpu_collectives(cfg)  # before anything starts a JAX backend
    train(cfg, _WORKDIR.value, _PREFLIGHT.value, _TOPOLOGY.value)


def _config_file(argv: list[str]) -> str | None:
    """The --config argument's file (ml_collections also accepts FILE:ARGS)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-file and config-override mistakes reported in one line."""
    config_file = _config_file(argv)
    if config_file is not None and not os.path.isfile(config_file):
        print(f"error: config file not found: {config_file}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no config key
        # The message is the key, quoted, and may go on with a "Did you mean ..." line.
        key, *hint = str(e.args[0] if e.args else e).splitlines()
        key = key.strip("'\"")
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        named = [a for a in overrides if key in a.split(".")] or overrides
        hint_text = f"; {' '.join(hint)}" if hint else ""
        print(f"error: unknown config key '{key}'{hint_text} (in {', '.join(named)})", file=sys.stderr)
    except (TypeError, ValueError) as e:  # ml_collections: an override of the wrong type
        print(f"error: bad config override: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
