"""Resuming a training run: the checkpoint to resume from (the newest that verifies and
reads; each bad step moved aside and named), the run-level checks of a resume (the same
parameters, the same settings unless allowed), and what a run whose state went bad leaves
(`RunCheckpoints.stop_at_bad_state`). Reading and writing checkpoints is checkpoint.py's."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from qstar_jax.errors import UserError
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.training.checkpoint import CORRUPT_DIR, TrainCheckpoints
from qstar_jax.training.metrics import status
from qstar_jax.training.step import TrainState


def verified_start(ckpt: TrainCheckpoints, moved: list[str]) -> int | None:
    """The newest checkpoint step whose files match its manifest; each newer one is moved
    aside (never deleted) and described in `moved`. None: no step was ever saved. When
    steps were saved and none verifies, the error names every step moved."""
    step = ckpt.latest_step()
    while step is not None and (problem := ckpt.verify(step)) is not None:
        moved.append(_move_aside(ckpt, step, f"is corrupt: {problem}"))
        step = ckpt.latest_step()
    if step is None and moved:
        raise UserError(f"no checkpoint in {ckpt.directory} is usable: {'; '.join(moved)}; rerun with "
                        f"--config.{FRESH_START_SETTING}=True to train from the start in this workdir, or use a "
                        "new --workdir")
    return step


FRESH_START_SETTING = "allow_fresh_start"  # the config key that lets a workdir with no usable step start over


def _move_aside(ckpt: TrainCheckpoints, step: int, why: str) -> str:
    """Moves a bad step aside: 'step STEP WHY; moved to WHERE'."""
    return f"step {step} {why}; moved to {ckpt.set_aside(step)}"


def restore_newest_readable(ckpt: RunCheckpoints, step: int, abstract_state, shardings, meta, train_documents: int,
                            allow_changes: bool, moved: list[str]) -> tuple[TrainState, int]:
    """Restores `step`, or the newest earlier step that verifies and reads, when Orbax cannot
    read it (each step moved aside is added to `moved`). Settings mismatches are not
    corruption: they stop the run."""
    while True:
        try:
            return ckpt.restore(step, abstract_state, shardings, meta, train_documents, allow_changes), step
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- Orbax/tensorstore raise many types for unreadable files
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            moved.append(_move_aside(ckpt, step, f"is unreadable ({type(e).__name__}: {reason})"))
            step = verified_start(ckpt, moved)


class RunCheckpoints(TrainCheckpoints):
    """Training checkpoints that carry and check the run's model / method configs."""

    def _check_same_parameters(self, step: int, saved: dict[str, Any], meta: dict[str, Any]) -> None:
        """The architecture and the think gate decide the parameter tree: a resume that
        changes either is refused in one line (Orbax would fail to read every step)."""
        if saved["model_config"] != meta["model_config"]:
            differing = sorted(k for k in meta["model_config"]
                               if saved["model_config"].get(k) != meta["model_config"][k])
            raise UserError(f"checkpoint at step {step} in {self.directory} is for another model "
                            f"(differs in: {', '.join(differing)}); use a new --workdir")
        gate = lambda m: (m.get("quiet_star") or {}).get("think_gate", "")
        if gate(saved) != gate(meta):
            raise UserError(f"checkpoint at step {step} in {self.directory} was trained with think_gate "
                            f"{gate(saved)!r}, this run has {gate(meta)!r}: the gate changes the parameters; use a "
                            "new --workdir (init_from the run adds or drops the gate)")

    def stop_at_bad_state(self, loss_bad: int, state_bad: int) -> UserError:
        """The error that ends a run whose state went bad (`step.first_bad_state`: the first
        state whose loss was not finite, the first that was not finite itself). Any checkpoint
        already holding that state or a later one (saved before the step that showed it) is
        moved aside, so the newest step left, which the message names, is truly good, and the
        same command resumes from it."""
        self.wait()
        first_bad = min(loss_bad, state_bad)
        cause = (f"non-finite loss at step {loss_bad + 1} (computed from the state after step {loss_bad})"
                 if loss_bad <= state_bad else f"non-finite parameters or optimizer state after step {state_bad}")
        bad_steps = [s for s in self.steps() if s >= first_bad]
        for step in bad_steps:
            self.set_aside(step)
        moved = (f"; checkpoint step{'s' if len(bad_steps) > 1 else ''} {', '.join(map(str, bad_steps))} "
                 f"held it or later states: moved to {CORRUPT_DIR}/") if bad_steps else ""
        good = self.latest_verified_step()
        newest = "no good checkpoint is left" if good is None else f"newest good checkpoint: step {good}"
        return UserError(f"{cause}; stopped without saving{moved}; {newest}")

    def save(self, step: int, state: TrainState, meta: dict[str, Any],  # type: ignore[override]
             metric: float | None = None, train_documents: int = 0) -> None:
        # The data position: rows are a pure function of (seed, step, row) over this many
        # training documents, so the next step is all a resume needs.
        super().save(step, state.to_dict(), {"next_step": step, "train_documents": train_documents}, meta, metric)

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState,  # type: ignore[override]
                meta: dict[str, Any], train_documents: int = 0, allow_changes: bool = False) -> TrainState:
        saved = self.restore_meta(step)
        self._check_same_parameters(step, saved, meta)
        changes = changed_settings(with_new_defaults(saved.get("settings", meta["settings"]), meta["settings"]),
                                   meta["settings"])
        followed = [c for c in changes if c.split(":")[0] in meta.get("follows_steps", [])]
        for change in followed:  # e.g. a cosine schedule now decays over the new number of steps
            status(f"note: steps changed, and with it {change}")
        changes = [c for c in changes if c not in followed]
        if changes and not allow_changes:
            raise UserError(f"checkpoint at step {step} in {self.directory} was trained with other settings "
                            f"({'; '.join(changes)}); rerun with them, use a new --workdir, or pass "
                            "--config.allow_config_change=True")
        if changes:
            status(f"warning: resuming step {step} with changed settings: {'; '.join(changes)}")
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )
        state, data_state = super().restore(step, target.to_dict())
        if data_state["next_step"] != step:
            raise UserError(f"checkpoint at step {step} has inconsistent data state {data_state}")
        saved_documents = data_state.get("train_documents", train_documents)
        if saved_documents != train_documents:
            status(f"warning: the checkpoint was trained on {saved_documents} documents, the data now has "
                   f"{train_documents}: rows from step {step} on differ from an uninterrupted run")
        return TrainState.from_dict(state)


def with_new_defaults(saved_settings: dict[str, Any], current_settings: dict[str, Any]) -> dict[str, Any]:
    """Saved run settings with the quiet_star options added since they were saved (present in
    `current_settings`, absent from the checkpoint) at their defaults, which keep the old
    behaviour: an older checkpoint resumes unchanged."""
    # Settings recorded since (the tokenizer's) were whatever this run says: not a change.
    saved_settings = {**{k: v for k, v in current_settings.items() if k not in saved_settings}, **saved_settings}
    saved_qs, current_qs = saved_settings.get("quiet_star"), current_settings.get("quiet_star")
    if not isinstance(saved_qs, dict) or not isinstance(current_qs, dict):
        return saved_settings
    defaults = {f.name: f.default for f in dataclasses.fields(QuietStarConfig)
                if f.name in current_qs and f.name not in saved_qs}
    return {**saved_settings, "quiet_star": {**defaults, **saved_qs}}


def changed_settings(saved: Any, current: Any, name: str = "") -> list[str]:
    """'key: saved -> current' for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [change for key in sorted(set(saved) | set(current))
                for change in changed_settings(saved.get(key), current.get(key), f"{name}.{key}" if name else key)]
    return [] if saved == current else [f"{name}: {saved!r} -> {current!r}"]
