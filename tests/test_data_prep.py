"""Data preparation at scale: tokenising in batches gives exactly the pairs, data reports and errors that one row
at a time gives, and that midpo gave before it batched (digests pinned from commit 105fb19), for the default
byte-level tokenizer, a BPE tokenizer that adds BOS (and a chat template that adds it too), and a slow one."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from midpo_cli.config import DatasetConfig
from midpo_cli.data.prepare import build_pairs
from midpo_cli.data.sources import load_rows
from midpo_cli.engine.models import byte_tokenizer

TOK = byte_tokenizer()
DATA = Path(__file__).parent / "data" / "standard.jsonl"
SYS = {"role": "system", "content": "Be brief."}
LONG = "The quick brown fox jumps over the lazy dog. " * 40                     # 1,800 characters


def user(text):
    return [{"role": "user", "content": text}]


def reply(text):
    return [{"role": "assistant", "content": text}]


# One of each shape the row path meets, in an order that mixes drop reasons (the report keeps first-seen order).
VARIED = [
    {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5, I think."},
    {"prompt": "same", "chosen": "x", "rejected": "x"},                                      # bad: identical
    {"prompt": [SYS, *user("Say 1")], "chosen": reply("1"), "rejected": reply("I will say 2")},
    {"prompt": user("Name a colour"), "chosen": " Blue.", "rejected": " A dog."},              # text replies
    {"chosen": "Q: 3+1? A: 4", "rejected": "Q: 3+1? A: 5"},                                 # implicit prompt
    {"chosen": [*user("hi"), *reply("hello")], "rejected": [*user("hi"), *reply("go away")]},
    {"prompt": "p" * 40, "chosen": "c" * 30, "rejected": "r"},                             # truncated prompt
    {"prompt": "q", "chosen": None, "rejected": "b"},                                       # bad: null
    {"prompt": "short", "chosen": "a" * 30 + "X", "rejected": "a" * 30 + "Y"},             # identical once cut
    {"prompt": "w", "chosen": "ab", "rejected": "c", "chosen_weights": [0.5, 1], "rejected_weights": [2, 3, 4]},
    {"prompt": user("copy: abcd"), "chosen": "abcd", "rejected": ""},                       # empty (built-in)
    {"prompt": 42, "chosen": "a", "rejected": "b"},                                         # bad: not text
    {"prompt": "caf\u00e9 \U0001F600", "chosen": " na\u00efve", "rejected": " \u00fcber"},
    {"prompt": LONG, "chosen": LONG, "rejected": "no"},                                     # cut in characters
    {"prompt": [SYS, *user("Sort: dcba")], "chosen": reply("abcd"), "rejected": reply("")},  # empty message
]
RAW_BAD = ['{"prompt": "cut off', '[1, 2]']                                                 # unreadable lines

CASES = {                                          # name: (file, dataset settings, per-token columns)
    "standard": ("standard", {}, ()),
    "standard-short": ("standard", {"max_length": 12, "max_prompt_length": 8}, ()),
    "standard-drop": ("standard", {"max_length": 12, "max_prompt_length": 8, "truncation": "drop"}, ()),
    "varied": ("varied", {"max_bad_fraction": 1.0}, ()),
    "varied-short": ("varied", {"max_length": 24, "max_prompt_length": 12, "max_bad_fraction": 1.0}, ()),
    "varied-drop": ("varied", {"max_length": 24, "max_prompt_length": 12, "truncation": "drop",
                               "max_bad_fraction": 1.0}, ()),
    "varied-empty-ok": ("varied", {"allow_empty_completions": True, "max_bad_fraction": 1.0}, ()),
    "varied-columns": ("varied", {"max_bad_fraction": 1.0}, ("weights",)),
    "varied-eval-split": ("varied", {"eval_fraction": 0.4, "max_bad_fraction": 1.0}, ()),
}
EXPECTED = {                                       # digest() of commit 105fb19's pairs and reports
    "standard": "0ebac5b1040af21d",
    "standard-short": "23ddad8ba1e4f744",
    "standard-drop": "ac0b227cb241a0a6",
    "varied": "54762a29fb336d57",
    "varied-short": "a03502d57d27cde8",
    "varied-drop": "43cc96db1914e454",
    "varied-empty-ok": "c65090d9864c6a56",
    "varied-columns": "a545af5fe94b086e",
    "varied-eval-split": "1506822d1dbaf4d0",
}
ERRORS = {                                         # name: (file, settings); the error stops preparation
    "first-bad-row": ("varied", {"on_bad_rows": "error"}),
    "bad-after-tokenising": ("cut", {"on_bad_rows": "error", "max_length": 24, "max_prompt_length": 12}),
    "no-room": ("standard", {"max_length": 8, "max_prompt_length": 8}),
}


def write_varied(path: Path) -> Path:
    lines = [json.dumps(r) for r in VARIED]
    lines[4:4] = RAW_BAD
    path.write_text("\n".join(lines) + "\n")
    return path


def digest(pairs: list, reports: list) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(repr((p.prompt, p.chosen, p.rejected, p.truncated, sorted(p.values.items()))).encode())
    h.update(json.dumps(reports).encode())                                  # key order too: first-seen reasons
    return h.hexdigest()[:16]


def prepare(name: str, tmp_path, monkeypatch) -> str:
    """load_rows + build_pairs for train and eval, as a run does; FILE:LINE relative so digests travel."""
    file, settings, columns = CASES[name] if name in CASES else (*ERRORS[name], ())
    monkeypatch.chdir(tmp_path)
    if file == "standard":
        shutil.copy(DATA, tmp_path / "data.jsonl")
    elif file == "cut":                                                    # bad only once truncated
        (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [VARIED[0], VARIED[8]] * 3))
    else:
        write_varied(tmp_path / "data.jsonl")
    cfg = OmegaConf.structured(DatasetConfig(source="local", path="data.jsonl", **{"eval_fraction": 0.0, **settings}))
    train, evals = load_rows(cfg)
    train_pairs, train_report = build_pairs(train, TOK, cfg, columns, "train")
    eval_pairs, eval_report = build_pairs(evals, TOK, cfg, columns, "eval")
    return digest(train_pairs + eval_pairs, [train_report, eval_report])


@pytest.mark.parametrize("name", CASES)
def test_prepared_data_is_unchanged(name, tmp_path, monkeypatch):
    assert prepare(name, tmp_path, monkeypatch) == EXPECTED[name]


STOP = (". (dataset.on_bad_rows=error stops at the first bad row; dataset.on_bad_rows=drop drops and counts them "
        "instead)")


@pytest.mark.parametrize("name, message", [
    ("first-bad-row", "data.jsonl:2: chosen identical to rejected; a pair with chosen == rejected carries no "
                      "preference: fix or delete the row" + STOP),
    ("bad-after-tokenising", "data.jsonl:2: chosen identical to rejected after truncation (max_length=24, "
                             "max_prompt_length=12); they differ only in what truncation cut: raise "
                             "dataset.max_length / max_prompt_length, or let such pairs be dropped" + STOP),
    ("no-room", "data.jsonl:1: max_length=8 leaves no room for the completion after a 8-token prompt; raise "
                "dataset.max_length or lower max_prompt_length"),
])
def test_preparation_stops_at_the_same_row_with_the_same_words(name, message, tmp_path, monkeypatch):
    with pytest.raises(ValueError) as e:
        prepare(name, tmp_path, monkeypatch)
    assert str(e.value) == message


def test_the_config_is_read_once_per_file_not_per_row(tmp_path, monkeypatch):
    """An OmegaConf look-up costs tens of microseconds; the row path reads plain settings (data/settings.py), so
    preparing 10 or 200 rows reads the config as often."""
    from omegaconf import DictConfig

    reads = []
    real = DictConfig.__getattr__
    monkeypatch.setattr(DictConfig, "__getattr__", lambda self, key: reads.append(key) or real(self, key))
    counts = []
    for n in (10, 200):
        path = tmp_path / f"{n}.jsonl"
        path.write_text("".join(json.dumps({**VARIED[i % len(VARIED)]}) + "\n" for i in range(n)))
        cfg = OmegaConf.structured(DatasetConfig(source="local", path=str(path), on_bad_rows="drop",
                                                 max_bad_fraction=1.0))
        reads.clear()
        train, evals = load_rows(cfg)
        build_pairs(train, TOK, cfg, (), "train")
        build_pairs(evals, TOK, cfg, (), "eval")
        counts.append(len(reads))
    assert counts[0] == counts[1] > 0


# ---------------------------------------------------------------- batched tokenising == one row at a time

BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")


def bpe_tokenizer():
    """A small byte-level BPE that adds BOS like Llama's, with a chat template that writes BOS too (doubled)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [json.dumps(r) for r in VARIED] * 20 + [LONG]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = BOS_TEMPLATE
    return tok


def slow_tokenizer():
    """A slow (pure Python) tokenizer: one token per character, BOS added to each text with special tokens."""
    from transformers import PreTrainedTokenizer

    class Chars(PreTrainedTokenizer):
        def __init__(self, **kw):
            tokens = ["<pad>", "<bos>", "<eos>", "<unk>", "\n"] + [chr(c) for c in range(32, 256)]
            self.vocab = {t: i for i, t in enumerate(tokens)}
            super().__init__(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", **kw)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text, **kw):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 3)

        def _convert_id_to_token(self, i):
            return next(t for t, j in self.vocab.items() if j == i)

        def build_inputs_with_special_tokens(self, ids, pair=None):
            return [self.bos_token_id] + ids

    tok = Chars()
    tok.chat_template = BOS_TEMPLATE
    return tok


def outcome(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except Exception as e:                                                  # noqa: BLE001
        return e


def same(a, b) -> bool:
    """Equal pairs, or exceptions of the same type and words."""
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    return a == b


@pytest.mark.parametrize("tokenizer", ["byte", "bpe", "slow"])
def test_batched_tokenising_equals_one_row_at_a_time(tokenizer):
    from midpo_cli.data.rows import check_row
    from midpo_cli.data.tokenize import Rules, char_limit, encode_pair, encode_pairs

    tok = {"byte": TOK, "bpe": bpe_tokenizer, "slow": slow_tokenizer}[tokenizer]
    tok = tok if tok is TOK else tok()
    cfg = OmegaConf.structured(DatasetConfig(source="local", allow_empty_completions=True))
    rows = [outcome(check_row, r, cfg) for r in VARIED]
    rows = [r[1] for r in rows if not isinstance(r, Exception)]
    assert len(rows) == 11
    if tokenizer != "byte":                                                 # the template's BOS and the tokenizer's:
        assert tok(tok.apply_chat_template(rows[1]["prompt"], tokenize=False))["input_ids"][:2] == [1, 1]
        p = encode_pair(tok, rows[1], 512, 256)                             # kept once
        assert p.prompt[0] == tok.bos_token_id != p.prompt[1]
    settings = [(512, 256, "keep_end", ()), (24, 12, "keep_end", ()), (24, 12, "drop", ()), (12, 12, "keep_end", ()),
                (40, 20, "keep_end", ("weights",)), (512, 256, "keep_end", ("weights",))]
    seen = set()
    for max_length, max_prompt_length, truncation, columns in settings:
        limit = char_limit(tok, max_length)
        alone = [outcome(encode_pair, tok, r, max_length, max_prompt_length, columns, truncation) for r in rows]
        seen |= {type(a).__name__ if isinstance(a, Exception) else a.truncated for a in alone}
        for chunk in (1, 5, 1024):
            batched = encode_pairs(tok, rows, Rules(max_length, max_prompt_length, columns, truncation, limit), chunk)
            assert len(batched) == len(alone) and all(map(same, batched, alone)), (max_length, truncation, chunk)
    assert seen >= {"", "prompt", "completion", "prompt+completion", "Dropped", "ValueError"}   # every outcome met


def test_the_rust_shortcut_is_taken_only_where_it_gives_the_same_ids():
    """BatchIds skips character offsets through the Rust tokenizer once the first batch of each kind matched the
    plain call; a tokenizer that changes ids in Python (here: lower-cases the text) keeps the plain call."""
    from transformers import PreTrainedTokenizerFast

    from midpo_cli.data.rows import check_row
    from midpo_cli.data.tokenize import BatchIds, Rules, char_limit, encode_pair, encode_pairs

    class Lower(PreTrainedTokenizerFast):
        def _encode_plus(self, text, *args, **kw):
            return super()._encode_plus([t.lower() for t in text] if isinstance(text, list) else text.lower(),
                                        *args, **kw)

    lower = Lower(tokenizer_object=TOK.backend_tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    lower.chat_template = TOK.chat_template
    rows = [check_row(r, OmegaConf.structured(DatasetConfig(source="local")))[1] for r in (VARIED[0], VARIED[2], VARIED[12])] * 3
    for tok, shortcut in ((TOK, True), (lower, False)):
        ids = BatchIds(tok)
        assert ids(["Ab c", "D"], specials=True) == [tok("Ab c")["input_ids"], tok("D")["input_ids"]]
        assert ids(["Ab c"], specials=False) == [tok("Ab c", add_special_tokens=False)["input_ids"]]
        assert (ids.rust is not None and ids.trusted == {True, False}) is shortcut
        alone = [encode_pair(tok, r, 64, 32) for r in rows]
        assert encode_pairs(tok, rows, Rules(64, 32, (), "keep_end", char_limit(tok, 64)), chunk=2) == alone
    assert encode_pair(lower, rows[0], 64, 32) != encode_pair(TOK, rows[0], 64, 32)    # the test means something
