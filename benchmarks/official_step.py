"""Times the official Quiet-STaR train step (PyTorch) at one shape; prints one JSON line.

Run it with the python of a venv that holds the official model code, never ours:
torch 2.13.0 and transformers 4.37.2 with ezelikman/quiet-star's `modeling_mistral.py` and
`configuration_mistral.py` dropped over transformers' `models/mistral` folder
(`benchmarks/side_by_side.py --help` says how; that code is not part of this repository).
`benchmarks/side_by_side.py` runs it alternately with our step.

The step is what the official training script runs per batch: forward (thoughts, talk,
REINFORCE and NLL inside the model), backward, gradient clipping at 1.0, AdamW.

    VENV/bin/python benchmarks/official_step.py --hidden 64 --layers 2 --heads 4 --kv 2 \
        --inter 256 --vocab 1000 --batch 4 --seq 256 --n-ahead 12 --talk 4 --passes 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

SPECIAL = ("<pad>", "<s>", "</s>")
THOUGHT_TOKENS = ("<|startthought|>", "<|endthought|>")  # the names the official code looks up


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` ids whose first word is "---" (the
    official code initialises the thought embeddings from it) and whose last two ids are
    the thought tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["---"] + [f"w{i}" for i in range(vocab_size - len(SPECIAL) - len(THOUGHT_TOKENS) - 1)]
    vocab = {token: i for i, token in enumerate([*SPECIAL, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(THOUGHT_TOKENS)})
    if len(tokenizer) != vocab_size:
        raise SystemExit(f"tokenizer has {len(tokenizer)} ids, wanted {vocab_size}")
    return tokenizer


def official_model(args: argparse.Namespace):
    """A random Mistral with the official Quiet-STaR training switches (its train script's values)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv,
        max_position_embeddings=4096, sliding_window=4096, pad_token_id=0,
        max_thoughts=args.n_ahead + args.talk + 1, merged_talk_heads=True, merged_lm_and_talk_heads=False,
        merged_lm_and_think_heads=True, use_concat_talk_head=True, use_shallow_think=True,
        use_shallow_talk=False, use_complex_think_head=False, use_complex_talk_head=True,
        use_weighted_talk_head=True, attn_implementation="sdpa",
    )
    model = MistralForCausalLM(config)
    settings = dict(
        tokenizer=word_tokenizer(args.vocab), gumbel_detach=True, include_policy_loss=True,
        use_end_thought_token=True, use_start_thought_token=True, n_ahead=args.n_ahead,
        n_ahead_talk=args.talk, n_passes=args.passes, n_tokens_print=1, gradient_accumulation_steps=1,
        residual_think_head=False, optimize_lm_head_only_at_start=False, gumbel_temperature=1,
        wandb_enabled=False, original_mode=False, config_params={}, run_start=int(time.time()),
        kill_after=10**9,
    )
    for name, value in settings.items():
        setattr(model, name, value)
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("hidden", 64), ("layers", 2), ("heads", 4), ("kv", 2), ("inter", 256), ("vocab", 1000),
                          ("batch", 4), ("seq", 256), ("n-ahead", 12), ("talk", 4), ("passes", 2), ("steps", 3),
                          ("threads", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = official_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.001)
    ids = torch.randint(len(SPECIAL), args.vocab - len(THOUGHT_TOKENS), (args.batch, args.seq))
    times = []
    for _ in range(args.steps + 1):  # the first step is warm-up
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    print(json.dumps({"impl": "official", "step_s": round(statistics.median(times[1:]), 4),
                      "times_s": [round(t, 4) for t in times], "loss": round(float(loss), 4),
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                      "torch_threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
