#!/usr/bin/env python3
"""Build a tiny random-weight Llama model that vLLM can serve on a CPU, without any hub.

Usage: make_tiny_model.py [--scorer] OUT_DIR

With --scorer, the same model with one classification head instead of the language model
head (LlamaForSequenceClassification, one label): a cross-encoder, which vLLM serves as a
pooling model on /v1/rerank and /v1/score.

Run it with a Python that has torch, transformers and tokenizers (the vLLM venv does).
The output is deterministic (fixed seeds, fixed training text), about 1 MB, and readable by
every user (files 0644, directories 0755), because the directory is copied to test hosts
where vLLM runs as its own system user. A second run with an existing OUT_DIR/config.json
does nothing.

The weights are random, so the model writes gibberish: it exists to exercise the serving
path (tokenizer, chat template, sampling, streaming, token counting), not to answer anything.
Shape rules learnt on this test bed: head_dim must be one of vLLM's supported sizes
(32, 64, 80, ..., 256, 512); 16 crashes the engine on the first request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen and others use it; generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the tokenizer. Plain prose of our own, so the script needs nothing from
# the network; repeated below to give the BPE trainer enough pair counts.
CORPUS = """\
The gateway stands in front of the model server and checks every request before it goes on.
A key names a user, a quota, the models it may use and the limits that apply to it.
Requests per second, concurrent requests and tokens per minute are counted for each key and
for the whole service; a request over a limit is answered at once with a clear message.
When a client streams a completion, each chunk is passed on as soon as it arrives, and the
tokens it used are counted when the stream ends or when the client goes away.
Hello, how are you today? I am fine, thank you. What is the weather like in the mountains?
It was a bright cold day in April, and the clocks were striking thirteen. The quick brown fox
jumps over the lazy dog. Pack my box with five dozen liquor jugs. Sphinx of black quartz,
judge my vow. How vexingly quick daft zebras jump! The five boxing wizards jump quickly.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14159 2.71828 42.
Code: def main(): return {"status": "ok", "items": [1, 2, 3]} # a comment
for i in range(10): print(i * i) if x > 0 else None; while True: break
Punctuation: a, b; c: d. e! f? (g) [h] {i} <j> "k" 'l' - m _ n / o \\ p | q & r * s + t = u.
Once upon a time there was a small server in a quiet data centre. Every morning it woke up,
loaded its weights, and waited for questions. Some questions were short, some were long;
some asked for poems, others for lists, and a few asked for nothing at all.
"""


def _build(out: Path, scorer: bool = False) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(SEED)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        torch_dtype="bfloat16",
    )
    if scorer:
        config.num_labels = 1  # one relevance score per (query, document)
    head = LlamaForSequenceClassification if scorer else LlamaForCausalLM
    model = head(config).to(torch.bfloat16)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


def _make_world_readable(root: Path) -> None:
    root.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            (Path(dirpath) / d).chmod(0o755)
        for f in filenames:
            (Path(dirpath) / f).chmod(0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    parser.add_argument(
        "--scorer", action="store_true", help="a cross-encoder (rerank, score), not a generator"
    )
    args = parser.parse_args(argv)
    out: Path = args.out_dir

    if (out / "config.json").is_file():
        print(f"tiny model already present in {out}", file=sys.stderr)
        return 0

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename, so an interrupted run never leaves a directory
    # that a later run would take for a finished model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build(tmp, scorer=args.scorer)
        _make_world_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"tiny model written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
