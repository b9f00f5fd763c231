"""Data preparation of the test data, pinned: the pairs, data reports and errors that load_rows + build_pairs give
(digests of commit 105fb19), so that a faster preparation is known to give bit-identical data."""
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
