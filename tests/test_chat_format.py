"""The `megrez` conversation template renders exactly as Megrez's Jinja chat template, and its stop tokens
come from the tokenizer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from megrez_mlc.conversation import MEGREZ_JINJA_TEMPLATE, MEGREZ_STOP_TOKENS, Conversation, megrez_template
from megrez_mlc.quantize.gen_config import gen_config
from megrez_mlc.runtime.tokenizer import Tokenizer

CONTENTS = (
    "Hello, world!",
    "你好，Megrez！今天天气很好。",
    "Emoji 😀🎉🚀 and 中文 mixed",
    "",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n  indented",
    "def main():\n    print('hi')\n    return 0",
    "braces {user_message} {system_message} {{ }} % }",
    "人工智能正在改变我们的生活。请用中文回答这个问题。",
    "👨‍👩‍👧 family, 🇨🇳 flag, é and é",
    "numbers 3.14159 and 2024",
    "a",
)
SYSTEMS = ("You are a helpful assistant.", "你是一个乐于助人的助手。", "", "系统 🚀 prompt")


def generated_conversations(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """With and without a system message; 1 to 4 turns; some end with an answer, some with a question."""
    rng = random.Random(seed)
    conversations = []
    for i in range(count):
        messages = []
        if i % 2:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for turn in range(1 + i % 4):
            messages.append({"role": "user", "content": rng.choice(CONTENTS)})
            if turn < i % 4 or i % 3 == 0:
                messages.append({"role": "assistant", "content": rng.choice(CONTENTS)})
        conversations.append(messages)
    return conversations


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_hf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf)


def test_tiny_checkpoint_carries_megrez_jinja_template(tiny_hf: Path) -> None:
    config = json.loads((tiny_hf / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == MEGREZ_JINJA_TEMPLATE


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_transformers_apply_chat_template(
    hf_tokenizer, tiny_hf: Path, add_generation_prompt: bool
) -> None:
    conversations = [
        *generated_conversations(24),
        [{"role": "assistant", "content": "我先说"}, {"role": "user", "content": "ok"}],
        [{"role": "user", "content": "hi"}, {"role": "system", "content": "a later system message"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    ]
    contents = [m["content"] for c in conversations for m in c]
    assert sum(c[0]["role"] == "system" for c in conversations) == 13
    assert any(len(c) >= 7 for c in conversations)  # multi-turn
    assert "" in contents and any("😀" in t for t in contents) and any("你好" in t for t in contents)
    template = megrez_template()
    tokenizer = Tokenizer(tiny_hf)
    for messages in conversations:
        expected_text = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        expected_ids = hf_tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
        )["input_ids"]
        text = template.render(messages, add_generation_prompt=add_generation_prompt)
        assert text == expected_text, messages
        assert tokenizer.encode(text) == expected_ids, messages


def test_message_parts_surround_the_content() -> None:
    template = megrez_template()
    before, after = template.message_parts("assistant")
    assert before == "<|role_start|>assistant<|role_end|>" == template.generation_prompt()
    assert after == "<|turn_end|>"
    assert template.render_message("user", "你好") == "<|role_start|>user<|role_end|>你好<|turn_end|>"


def test_chat_config_stop_tokens_are_the_tokenizer_ids_of_megrez_stop_strings(built, hf_tokenizer) -> None:
    model = built("q4f32_1")
    chat_config = json.loads((model.model_dir / "mlc-chat-config.json").read_text(encoding="utf-8"))
    conv = Conversation.from_json(chat_config["conv_template"])
    assert conv.to_json() == megrez_template(conv.stop_token_ids).to_json()  # one source of truth
    assert conv.stop_token_ids == hf_tokenizer.convert_tokens_to_ids(list(MEGREZ_STOP_TOKENS))
    assert conv.stop_str == ["<|turn_end|>", "<|eos|>", "<|turn_end>"]
    assert len(set(conv.stop_token_ids)) == 3


def test_stop_tokens_skip_strings_the_tokenizer_lacks(tiny_hf: Path, tmp_path: Path) -> None:
    """Most Megrez tokenizer revisions have no `<|turn_end>`: the stop ids are then the other two."""
    hf = shutil.copytree(tiny_hf, tmp_path / "hf")
    tokenizer_json = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["added_tokens"] = [
        t for t in tokenizer_json["added_tokens"] if t["content"] != "<|turn_end>"
    ]
    (hf / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    config = gen_config(hf, tmp_path / "out", "q4f32_1")
    ids = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    assert config.conv_template["stop_token_ids"] == [ids["<|turn_end|>"], ids["<|eos|>"]]
