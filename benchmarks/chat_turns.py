"""Multi-turn chat: what keeping the KV cache between turns saves.

Builds a small random Megrez-shaped model (8 layers, hidden 512, GQA 8/2, q4f32_1; nothing downloaded),
holds a conversation with `ChatSession`, and for each turn compares the prefill it ran (only the new
tokens) with prefilling the whole conversation from scratch, as a stateless chat would.

    PYTHONPATH=. python benchmarks/chat_turns.py [--turns 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from megrez_mlc.compile.compiler import compile_model
from megrez_mlc.quantize.convert import convert_weight
from megrez_mlc.quantize.gen_config import gen_config
from megrez_mlc.runtime import ChatSession, Engine, SamplingParams
from megrez_mlc.tiny import TinyShape, make_tiny_checkpoint

SHAPE = TinyShape(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
)
QUESTIONS = (
    "Tell me about the quick brown fox and the lazy dog, in English and in Chinese. 你好，世界！",
    "Large language models predict the next token. How does that work on a small device?",
    "人工智能正在改变我们的生活。请用中文回答这个问题，并且给出三个例子。",
    "What are emoji like 😀🎉🚀 made of, byte by byte?",
)


def build(workdir: Path) -> tuple[Path, Path]:
    hf_dir, model_dir = workdir / "hf", workdir / "q4f32_1"
    lib = model_dir / "lib.so"
    if not lib.is_file():
        make_tiny_checkpoint(hf_dir, shape=SHAPE)
        convert_weight(hf_dir, model_dir, "q4f32_1")
        gen_config(hf_dir, model_dir, "q4f32_1")
        compile_model(model_dir, "cpu", lib)
    return model_dir, lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, lib = build(args.workdir or Path(tmp))
        engine = Engine(model_dir, lib, max_batch_size=2, max_total_seq_len=2 * 4096)
        sampling = {"temperature": 0.0, "max_tokens": args.answer_tokens, "ignore_eos": True}
        one_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        print(
            f"{SHAPE.num_hidden_layers} layers, hidden {SHAPE.hidden_size}, q4f32_1, cpu; "
            f"{args.answer_tokens}-token answers"
        )
        print(
            "| turn | prompt tok | kept: prefill tok | kept: prefill ms | "
            "from scratch: prefill tok | from scratch: prefill ms |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        with ChatSession(engine, **sampling) as session:
            for turn in range(1, args.turns + 1):
                session.ask(QUESTIONS[(turn - 1) % len(QUESTIONS)])
                kept = session.stats
                # the same prompt prefilled from scratch in a new sequence (one token generated)
                history = session.token_ids()
                prompt = history[: len(history) - len(session.history[-1].token_ids)]
                prompt += session.generation_prompt_ids
                scratch = engine.generate(prompt, one_token).stats
                print(
                    f"| {turn} | {len(prompt)} | {kept.prefill_tokens} | {kept.prefill_seconds * 1e3:.1f} | "
                    f"{scratch.prefill_tokens} | {scratch.prefill_seconds * 1e3:.1f} |"
                )


if __name__ == "__main__":
    main()
