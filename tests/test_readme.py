"""The README's two commands stay true: CI runs exactly its test command."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash_blocks(path):
    with open(os.path.join(REPO, path)) as f:
        return re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = [b.strip() for b in _bash_blocks("README.md")]
    test_commands = [b for b in readme if "pytest" in b]
    assert len(test_commands) == 1
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci_lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert test_commands[0] in ci_lines


def test_readme_main_command_trains_the_default_experiment():
    main = [b.strip() for b in _bash_blocks("README.md") if "qstar_jax.train" in b and "--workdir" in b]
    assert main and "experiments/tiny_cpu.py" in main[0]
    assert os.path.isfile(os.path.join(REPO, "experiments", "tiny_cpu.py"))
