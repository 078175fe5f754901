"""Fast Quiet-STaR: the NTP loss, stage chaining by best checkpoint, chain resume, the NTP model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from process_env import forced_devices
from test_train import REPO, assert_ok

from qstar_jax.training import checkpoint
from qstar_jax.training import curriculum
from qstar_jax.training import setup, trainer
from qstar_jax.models.config import ModelConfig
from qstar_jax.inference.decode import generate
from qstar_jax.models.transformer import apply_lm, init_params
from qstar_jax.method.ntp import NTPConfig, ntp_loss, ntp_terms
from qstar_jax.tokenizer import END_THOUGHT, START_THOUGHT

SMALL_DATA = {"seq_len": 24, "default_documents": 300, "eval_documents": 20}


# ------------------------------------------------------------------------------ NTP loss


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("form,clip", [("paper", False), ("paper", True), ("code", True)])
def test_ntp_loss_equals_hand_computation(form, clip):
    config = ModelConfig("llama", 40, 32, 64, 2, 4, 2, 8)
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 40)
    valid = jnp.ones((2, 7), bool).at[1, :2].set(False)  # left padding in row 1
    teacher_nll = jax.random.uniform(jax.random.key(2), (2, 7), maxval=6.0)
    rng = jax.random.key(3)
    ntp = NTPConfig(form=form, reward_weight=2.0, clip_negative_rewards=clip, reinforce_temperature=3.0,
                    nll_weight=0.3)
    loss, metrics = ntp_loss(config, ntp, params, tokens, valid, rng, teacher_nll)

    logits = np.asarray(apply_lm(config, params, tokens, None, valid), np.float64)[:, :-1]
    targets, t = np.asarray(tokens)[:, 1:], np.asarray(teacher_nll, np.float64)[:, :-1]
    mask = np.asarray(valid[:, 1:] & valid[:, :-1])
    rows, cols = np.indices(targets.shape)
    nll = -_log_softmax(logits)[rows, cols, targets]
    if form == "paper":  # REINFORCE on the gold token, reward = NLL_S - NLL_T
        reward, logp = nll - t, -nll
    else:  # the public code: r = NLL_T - NLL_S on an action sampled from the student
        reward = t - nll
        probs = np.exp(_log_softmax(logits))
        uniform = np.asarray(jax.random.uniform(rng, targets.shape))
        cdf = np.cumsum(probs, -1)
        action = (cdf < (uniform * cdf[..., -1])[..., None]).sum(-1)
        logp = _log_softmax(logits / 3.0)[rows, cols, action]
    if clip:
        reward = np.maximum(reward, 0.0)
    expected = -2.0 * (reward * logp)[mask].mean() + 0.3 * nll[mask].mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll_teacher"], t[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["teacher_gain"], (nll - t)[mask].mean(), rtol=1e-5, atol=1e-6)


def test_kl_form_equals_hand_computation():
    """form "kl": w * mean KL(p_T || p_S) over real targets, plus the NLL term; the teacher's
    NLL metric is read off its distribution at the gold token."""
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 2
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    mask = jnp.ones((2, 5), bool).at[0, :2].set(False)
    teacher = jax.nn.log_softmax(jax.random.normal(jax.random.key(2), (2, 5, 11)) * 3)
    terms = ntp_terms(NTPConfig(form="kl", reward_weight=2.0, nll_weight=0.3), logits, targets, mask, teacher,
                      jnp.zeros((2, 5)))
    s, t = _log_softmax(np.asarray(logits, np.float64)), np.asarray(teacher, np.float64)
    kl = (np.exp(t) * (t - s)).sum(-1)
    rows, cols = np.indices(targets.shape)
    nll = -s[rows, cols, np.asarray(targets)]
    m = np.asarray(mask)
    np.testing.assert_allclose(float(terms.loss), 2.0 * kl[m].mean() + 0.3 * nll[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(terms.nll_teacher), -t[rows, cols, np.asarray(targets)][m].mean(), rtol=1e-5)
    # Its gradient moves the student's whole distribution toward the teacher's: KL falls.
    grad = jax.grad(lambda z: ntp_terms(NTPConfig(form="kl"), z, targets, mask, teacher, jnp.zeros((2, 5))).loss)
    new = np.asarray(logits - 0.5 * grad(logits), np.float64)
    new_kl = (np.exp(t) * (t - _log_softmax(new))).sum(-1)
    assert np.all(new_kl[m] < kl[m])


def test_kl_teacher_distribution_is_the_post_thought_prediction():
    """The "kl" teacher's distribution is the one whose gold-token entry is NLL_T (same
    thoughts), renormalised over the student's vocabulary (the thought ids dropped)."""
    from test_quiet_star import CONFIGS, QS, VOCAB, make_batch, make_params

    from qstar_jax.method.ntp import teacher_batches, teacher_config

    config, qs = CONFIGS["llama"], teacher_config(QS, NTPConfig())
    params = make_params(config)
    tokens, valid = make_batch()
    rng = jax.random.key(5)
    nll = teacher_batches(config, qs, params, tokens[None], valid[None], rng)[0]
    full = teacher_batches(config, qs, params, tokens[None], valid[None], rng, VOCAB)[0]
    student = teacher_batches(config, qs, params, tokens[None], valid[None], rng, VOCAB - 2)[0]
    gold = jnp.take_along_axis(full, jnp.roll(tokens, -1, axis=1)[..., None], -1)[..., 0]
    target = np.asarray(valid & jnp.roll(valid, -1, axis=1)).copy()
    target[:, -1] = False
    np.testing.assert_allclose(np.asarray(-gold)[target], np.asarray(nll)[target], rtol=1e-5)
    renormalised = full[..., :VOCAB - 2] - jax.nn.logsumexp(full[..., :VOCAB - 2], axis=-1, keepdims=True)
    np.testing.assert_allclose(student, renormalised, atol=1e-5)
    assert student.shape == tokens.shape + (VOCAB - 2,)


def test_paper_form_pulls_each_token_nll_toward_the_teacher():
    """grad of -sg(NLL_S - NLL_T) log p_S(gold) == grad of 1/2 (NLL_S - NLL_T)^2: the student
    gains probability where the teacher is better and gives it up where it is worse."""
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    mask = jnp.ones((2, 5), bool).at[0, 0].set(False)
    teacher = jax.random.uniform(jax.random.key(2), (2, 5), maxval=5.0)
    uniform = jnp.zeros((2, 5))
    paper = jax.grad(lambda z: ntp_terms(NTPConfig(), z, targets, mask, teacher, uniform).loss)(logits)

    def squared_gap(z):
        nll = -jnp.take_along_axis(jax.nn.log_softmax(z), targets[..., None], -1)[..., 0]
        return 0.5 * jnp.sum(jnp.where(mask, (nll - teacher) ** 2, 0.0)) / mask.sum()

    np.testing.assert_allclose(paper, jax.grad(squared_gap)(logits), atol=1e-6)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    new = logits - 0.1 * paper
    new_nll = -jnp.take_along_axis(jax.nn.log_softmax(new), targets[..., None], -1)[..., 0]
    teacher_better = mask & (teacher < nll)
    assert bool(jnp.all(jnp.where(teacher_better, new_nll < nll, True)))
    assert bool(jnp.all(jnp.where(mask & ~teacher_better, new_nll > nll, True)))


# -------------------------------------------------------------------------- stage chaining


def _small_chain(stages, **top):
    from experiments import fast_quiet_star_tiny

    cfg = fast_quiet_star_tiny.get_config()
    cfg.data.update(SMALL_DATA)
    cfg.update(dict(tokenizer_vocab_size=300, eval_batches=1, log_every=1, **top))
    cfg.quiet_star.update(n_ahead=4, n_ahead_talk=2)
    cfg.curriculum.bench_tokens = 0
    cfg.curriculum.stages = stages
    return cfg


def _params_at(stage_dir, step):
    return checkpoint.load_for_inference(str(stage_dir), step)[2]


def test_reinit_thoughts_switch_restores_the_initial_thought_parts():
    """curriculum.reinit_thoughts (Fast Quiet-STaR's public code): a stage starting from a
    thinking checkpoint gets "---" start/end embeddings and a zero mixing-head output
    layer again; off (the default) it keeps its predecessor's."""
    from experiments import base
    from qstar_jax.method.mixing import init_quiet_star_params

    class Tokenizer:
        def encode(self, text):
            return {"---": [3]}[text]

        def token_id(self, token):
            return {START_THOUGHT: 48, END_THOUGHT: 49}[token]

    config = ModelConfig("llama", 50, 32, 64, 2, 4, 2, 8)
    cfg = base.get_config()
    lm = init_params(config, jax.random.key(0))
    trained = init_quiet_star_params(config, setup.quiet_star_config(cfg, Tokenizer()), lm,
                                     jnp.ones((32,)), jax.random.key(1))
    trained["mixing_head"]["out"]["kernel"] = jnp.ones_like(trained["mixing_head"]["out"]["kernel"])
    kept = setup.prepare_method(cfg, config, trained, Tokenizer())[2]
    assert kept is trained
    cfg.curriculum.reinit_thoughts = True
    _, qs, fresh, _ = setup.prepare_method(cfg, config, trained, Tokenizer())
    expected_D = np.asarray(lm["embed_tokens"]["embedding"][3]) / qs.embedding_scale
    for name in ("start", "end"):
        np.testing.assert_allclose(fresh["thought"][name], expected_D, rtol=1e-6)
    assert float(jnp.abs(fresh["mixing_head"]["out"]["kernel"]).max()) == 0.0
    np.testing.assert_array_equal(fresh["mixing_head"]["in"]["kernel"], trained["mixing_head"]["in"]["kernel"])
    assert fresh["lm"] is trained["lm"]


def test_each_stage_starts_from_the_checkpoint_with_the_best_metric(tmp_path, monkeypatch):
    """Real stage runs; only the metric is stubbed (lower is better): stage 1 must hand on
    step 1 (not its newest, 5), stage 2 its step 2 (not 3) with the thoughts it trained."""
    stubbed = iter([1.0, 3.0, 2.0, 5.0, 4.0] + [4.0, 0.5, 2.0] + [1.0])
    monkeypatch.setattr(curriculum, "selection_metric", lambda metrics, name: next(stubbed))
    cfg = _small_chain((
        {"name": "lm", "method": "lm", "steps": 5, "learning_rate": 1e-2, "every": 1},
        {"name": "think", "method": "quiet_star", "steps": 3, "learning_rate": 1e-2, "every": 1},
        {"name": "shorter", "method": "quiet_star", "steps": 1, "learning_rate": 1e-2, "every": 1, "n_ahead": 3},
    ), keep_checkpoints=3)
    trainer.train(cfg, str(tmp_path))
    chain = json.loads((tmp_path / "chain.json").read_text())["stages"]
    assert [s["best_step"] for s in chain] == [1, 2, 1]
    assert chain[0]["values"] == {"1": 1.0, "2": 3.0, "3": 2.0, "4": 5.0, "5": 4.0}
    lm_dir, think_dir, shorter_dir = (tmp_path / "stages" / d for d in ("01_lm", "02_think", "03_shorter"))
    assert sorted(os.listdir(lm_dir / "checkpoints"), key=int) == ["1", "3", "4", "5"]  # newest 3 + the best

    # The first update of a run is a no-op (the warmup schedule starts at lr 0), so a stage's
    # step-1 checkpoint holds exactly the params it started from.
    chosen, newest = _params_at(lm_dir, 1), _params_at(lm_dir, 5)
    started = _params_at(think_dir, 1)["lm"]
    vocab = chosen["embed_tokens"]["embedding"].shape[0]
    np.testing.assert_array_equal(started["embed_tokens"]["embedding"][:vocab], chosen["embed_tokens"]["embedding"])
    jax.tree.map(np.testing.assert_array_equal, started["layers"], chosen["layers"])
    assert not np.array_equal(newest["layers"]["q_proj"]["kernel"], chosen["layers"]["q_proj"]["kernel"])

    picked, later = _params_at(think_dir, 2), _params_at(think_dir, 3)
    assert np.abs(picked["mixing_head"]["out"]["kernel"]).max() > 0  # trained, not a fresh zero init
    jax.tree.map(np.testing.assert_array_equal, _params_at(shorter_dir, 1), picked)
    assert not np.array_equal(later["mixing_head"]["out"]["kernel"], picked["mixing_head"]["out"]["kernel"])


# ------------------------------------------------------------------- the whole chain by CLI

CHAIN_CONFIG = """
from experiments import fast_quiet_star_tiny


def get_config():
    config = fast_quiet_star_tiny.get_config()
    config.data.update({data})
    config.update(dict(tokenizer_vocab_size=300, eval_batches=1, log_every=1))
    config.curriculum.bench_tokens = {bench_tokens}
    config.curriculum.stages = (
        dict(name="base", method="lm", steps=3, learning_rate=1e-3, every=3),
        dict(name="think_4_2", method="quiet_star", steps=3, learning_rate=1e-3, every=3, n_ahead=4, n_ahead_talk=2),
        dict(name="think_3_1", method="quiet_star", steps=12, learning_rate=1e-3, every=2, n_ahead=3, n_ahead_talk=1),
        dict(name="ntp", method="ntp", steps=3, learning_rate=1e-3, every=3),
    )
    return config
"""


def run_chain(workdir, config_file, wait=True):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": forced_devices(1)}
    args = [sys.executable, "-m", "qstar_jax.train", "--config", str(config_file), "--workdir", str(workdir)]
    if not wait:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    config_file = root / "chain_config.py"
    config_file.write_text(CHAIN_CONFIG.format(data=SMALL_DATA, bench_tokens=3))
    result = run_chain(root / "straight", config_file)
    assert_ok(result)
    return root, result


def test_chain_summary_reports_metric_and_inference_cost_per_stage(chain):
    root, result = chain
    summary = json.loads((root / "straight" / "chain_summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["base", "think_4_2", "think_3_1", "ntp"]
    assert [s["forward_passes_per_token"] for s in summary["stages"]] == [1, 4, 3, 1]
    for stage in summary["stages"]:
        assert stage["tokens_per_s"] > 0 and np.isfinite(stage["value"])
        assert stage["value"] == min(stage["values"].values())
    assert summary["metric"] == "eval/nll_next" and "passes/token" in result.stdout


def test_interrupted_chain_resumes_at_its_stage_and_step(chain, tmp_path):
    root, _ = chain
    config_file = tmp_path / "chain_config.py"  # the same chain, without the speed measurements
    config_file.write_text(CHAIN_CONFIG.format(data=SMALL_DATA, bench_tokens=0))
    tmp_path = tmp_path / "run"
    proc = run_chain(tmp_path, config_file, wait=False)
    third = tmp_path / "stages" / "03_think_3_1" / "checkpoints"
    deadline = time.time() + 300
    while not (third / "2").is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "stage 3 never saved a checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = max(int(s) for s in os.listdir(third) if s.isdigit())
    assert interrupted_at < 12 and len(json.loads((tmp_path / "chain.json").read_text())["stages"]) == 2
    first_logs = [(tmp_path / "stages" / d / "metrics.jsonl").read_text() for d in ("01_base", "02_think_4_2")]

    resumed = run_chain(tmp_path, config_file)
    assert_ok(resumed)
    assert "stage 1/4 base (lm): done" in resumed.stdout and "stage 2/4 think_4_2 (quiet_star): done" in resumed.stdout
    assert f"resumed from step {interrupted_at} in {third.parent}" in resumed.stdout
    assert [(tmp_path / "stages" / d / "metrics.jsonl").read_text() for d in ("01_base", "02_think_4_2")] == first_logs
    straight = json.loads((root / "straight" / "chain.json").read_text())["stages"]
    again = json.loads((tmp_path / "chain.json").read_text())["stages"]
    assert [(s["best_step"], s["values"]) for s in again] == [(s["best_step"], s["values"]) for s in straight]
    _, _, a, _ = checkpoint.load_for_inference(str(root / "straight" / "model"))
    _, _, b, _ = checkpoint.load_for_inference(str(tmp_path / "model"))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_kl_student_trains_against_the_teacher_distribution(chain, tmp_path):
    """ntp.form=kl end to end: the teacher hands the step a distribution per token (B x N x V)
    and the logged loss is the mean KL (reward_weight 1, no NLL term), positive and finite."""
    root, _ = chain
    teacher = root / "straight" / "stages" / "03_think_3_1"
    data = [f"--config.data.{k}={v}" for k, v in SMALL_DATA.items()]
    result = subprocess.run(
        [sys.executable, "-m", "qstar_jax.train", "--config", "experiments/tiny_cpu.py", "--workdir", str(tmp_path),
         "--config.method=ntp", f"--config.init_from={teacher}", f"--config.ntp.teacher={teacher}",
         "--config.ntp.form=kl", "--config.steps=2", "--config.checkpoint_every=2", "--config.log_every=1",
         "--config.eval_every=0", "--config.optimizer.total_steps=2", *data],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=600, check=False)
    assert_ok(result)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2]
    for m in logged:
        assert 0 < m["loss"] == pytest.approx(m["reward"], rel=1e-5) and np.isfinite(m["nll_teacher"])


# ------------------------------------------------------------------------------ the NTP model


def test_ntp_model_is_a_plain_lm_for_our_generation_and_transformers(chain, tmp_path):
    import torch
    import transformers

    root, _ = chain
    model_dir = root / "straight" / "model"
    config, qs, params, tokenizer = checkpoint.load_for_inference(str(model_dir))
    assert qs is None and set(params) == {"embed_tokens", "layers", "final_norm", "lm_head"}
    assert tokenizer.token_id(START_THOUGHT) is None and tokenizer.token_id(END_THOUGHT) is None
    assert config.vocab_size == tokenizer.vocab_size
    prompt = jnp.asarray([tokenizer.encode("Ava has 12 apples.")], jnp.int32)
    ours, thoughts = generate(config, None, params, prompt, jnp.ones(prompt.shape, bool), jax.random.key(0), 6, 0.0,
                              False)
    assert thoughts.shape == (1, 6, 0)

    hf_dir = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "qstar_jax.convert", "--to-hf", "--checkpoint", str(model_dir),
                             "--output", str(hf_dir)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert_ok(result)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor(np.asarray(prompt)), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_id, eos_token_id=None)
    assert out[0, prompt.shape[1]:].tolist() == np.asarray(ours)[0].tolist()


def test_paper_chain_config_fails_fast_without_the_checkpoint(tmp_path):
    from test_train import _one_line_error, run_train

    result = run_train(tmp_path, config="experiments/fast_quiet_star_mistral.py")
    _one_line_error(result, "init_from directory does not exist: checkpoints/mistral-7b-v0.1")
