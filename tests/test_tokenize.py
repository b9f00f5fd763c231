"""Tokenisation: the completion starts where the prompt ends, EOS once, same truncation on both sides."""
import pytest

from midpo_cli.data.tokenize import collate, encode_pair
from midpo_cli.engine.models import byte_tokenizer

TOK = byte_tokenizer()


def test_standard_row_boundary_and_eos():
    p = encode_pair(TOK, {"prompt": "Q: hi\nA:", "chosen": " yes", "rejected": " no"}, 100, 50)
    assert TOK.decode(p.prompt) == "Q: hi\nA:"
    assert TOK.decode(p.chosen) == " yes<eos>" and p.chosen.count(TOK.eos_token_id) == 1
    assert TOK.decode(p.rejected) == " no<eos>"


def test_conversational_row_uses_template_and_one_eos():
    row = {"prompt": [{"role": "user", "content": "copy: ab"}],
           "chosen": [{"role": "assistant", "content": "ab"}], "rejected": [{"role": "assistant", "content": "b"}]}
    p = encode_pair(TOK, row, 100, 50)
    assert TOK.decode(p.prompt) == "<|user|>copy: ab<|assistant|>"
    assert TOK.decode(p.chosen) == "ab<eos>" and p.chosen.count(TOK.eos_token_id) == 1


def test_both_sides_truncated_by_the_same_rule():
    row = {"prompt": "x" * 30, "chosen": "c" * 40, "rejected": "r" * 10}
    p = encode_pair(TOK, row, max_length=40, max_prompt_length=20)
    assert len(p.prompt) == 20 and p.truncated
    assert len(p.chosen) == 20 and len(p.rejected) == 11        # each capped at the same budget


def test_no_room_for_completion_is_an_error():
    with pytest.raises(ValueError, match="max_length"):
        encode_pair(TOK, {"prompt": "x" * 30, "chosen": "a", "rejected": "b"}, max_length=10, max_prompt_length=20)


def test_collate_masks_only_completion_labels():
    pairs = [encode_pair(TOK, {"prompt": "ab", "chosen": "cd", "rejected": "e"}, 50, 50),
             encode_pair(TOK, {"prompt": "abc", "chosen": "d", "rejected": "efg"}, 50, 50)]
    b = collate(pairs, TOK.pad_token_id)
    assert b["input_ids"].shape[0] == 4 and b["labels"].shape == b["mask"].shape
    for row in range(4):
        labels = b["labels"][row][b["mask"][row].bool()].tolist()
        side = ["chosen", "rejected"][row // 2]
        assert labels == getattr(pairs[row % 2], side)
