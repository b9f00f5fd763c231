"""Bad input data: every problem is named (file, line, column, what to do), dropped and counted or refused,
never silent and never a traceback. The loader and row checks first, then end to end through the CLI."""
import gzip
import json
import os
import random
import sys

import pandas as pd
import pytest
from omegaconf import OmegaConf

from midpo_cli.__main__ import main
from midpo_cli.config import DatasetConfig
from midpo_cli.data import sources
from midpo_cli.data.prepare import build_pairs
from midpo_cli.data.rows import BadRow, check_row
from midpo_cli.data.sources import DataFileError, DataFileNotFound, load_rows, read_file
from midpo_cli.data.tokenize import Dropped, char_limit, encode_pair
from midpo_cli.engine.models import byte_tokenizer

TOK = byte_tokenizer()
TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.save_model=false",
        "dataset.eval_fraction=0.0", "dataset.max_length=64", "dataset.max_prompt_length=32"]
GOOD = [{"prompt": f"What is {i}+1?", "chosen": f" {i + 1}.", "rejected": f" {i + 2}, I think."} for i in range(30)]
CONV = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say 1"}],
        "chosen": [{"role": "assistant", "content": "1"}], "rejected": [{"role": "assistant", "content": "2"}]}


def cfg(path=None, **kw):
    return OmegaConf.structured(DatasetConfig(source="local", path=str(path), eval_fraction=0.0, **kw))


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def reason(row, **kw):
    with pytest.raises(BadRow) as e:
        check_row(row, cfg(**kw))
    return e.value.reason


# ---------------------------------------------------------------- the loader, one kind of bad file at a time

def test_jsonl_bad_lines_are_rows_with_their_physical_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n{"prompt": "q", "chosen": \n'
                  b'[1, 2]\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    rows = read_file(cfg(f))
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:3", f"{f}:4", f"{f}:5"]         # the blank line 2 skipped
    assert rows[0].problem is None and dict(rows[0]) == {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert [r.problem.reason for r in rows[1:]] == ["not valid JSON", "not a JSON object", "not valid UTF-8"]
    assert "column" in rows[1].problem.detail


def test_json_array_items_keep_their_line_and_a_broken_array_is_one_error(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('[\n  {"prompt": "q", "chosen": "a", "rejected": "b"},\n  7,\n\n  {"prompt": "r",\n'
                 '   "chosen": "c", "rejected": "d"}\n]\n')
    rows = read_file(cfg(f))
    assert [r.where for r in rows] == [f"{f}:2", f"{f}:3", f"{f}:5"]
    assert rows[1].problem.reason == "not a JSON object"
    f.write_text('[{"prompt": "q", "chosen": "a", "rejected": "b"},\n {"prompt": }]')
    with pytest.raises(DataFileError, match=r"p\.json:2: not valid JSON"):
        read_file(cfg(f))
    f.write_text('{"prompt": "q",\n "chosen": "a", "rejected": "b"}')
    with pytest.raises(DataFileError, match="one JSON object, not a list"):
        read_file(cfg(f))
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "r", "chosen": "a", "rejected": "b"}\n')
    assert len(read_file(cfg(f))) == 2                                       # JSON Lines named .json still work


def test_csv_rows_keep_their_first_line_and_cells_stay_text(tmp_path):
    f = tmp_path / "p.csv"
    msgs = json.dumps([{"role": "user", "content": "hi"}]).replace('"', '""')
    f.write_text(f'prompt,chosen,rejected\n"two\nlines",a,b\n42,true,\n"{msgs}",x,y\nonly,two\n'
                 "\"[{'role': 'user', 'content': 'hi'}]\",x,y\n")
    rows = read_file(cfg(f))
    assert [r.where for r in rows] == [f"{f}:{n}" for n in (2, 4, 5, 6, 7)]
    assert rows[0]["prompt"] == "two\nlines"
    assert rows[1] == {"prompt": "42", "chosen": "true", "rejected": ""}         # text, never numbers or booleans
    assert rows[2]["prompt"] == [{"role": "user", "content": "hi"}]              # a JSON message list cell
    assert rows[3].problem.reason == "wrong number of cells"
    assert rows[4].problem.reason == "column 'prompt': cell is not valid JSON"    # pandas' Python repr


def test_parquet_rows_are_numbered(tmp_path):
    f = tmp_path / "p.parquet"
    pd.DataFrame(GOOD[:3]).to_parquet(f)
    assert [r.where for r in read_file(cfg(f))] == [f"{f} row 1", f"{f} row 2", f"{f} row 3"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "empty"),
    ("blank.jsonl", b"\n  \n\n", "empty"),
    ("random.jsonl", random.Random(0).randbytes(4096), "binary file"),
    ("zipped.jsonl", gzip.compress(b'{"prompt": "q"}\n'), "gzip-compressed"),
    ("text.parquet", b'{"prompt": "q"}\n', "not a parquet file"),
    ("prefs.txt", b'{"prompt": "q"}\n', "unsupported extension '.txt'"),
    ("prefs.jsonl.gz", b"x", "decompress it first"),
    ("header.csv", b"prompt,chosen,rejected\n", "a header but no rows"),
    ("bom.csv", b"\xef\xbb\xbf\n", "empty"),
    ("bom.json", b"\xef\xbb\xbf  \n", "empty"),
    ("latin1.csv", "prompt,chosen,rejected\ncaf\xe9,a,b\n".encode("latin-1"), "latin1.csv:2: not UTF-8 text"),
    ("pretty.jsonl", b'[\n {"prompt": "q"}\n]\n', "a JSON array, not JSON Lines"),
    ("semi.csv", b"prompt;chosen;rejected\nq;a;b, c\n", "semi.csv:1: .* semicolon-separated"),
    ("tabs.csv", b"prompt\tchosen\trejected\nq\ta\tb\n", "tabs.csv:1: .* tab-separated"),
    ("deep.json", b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]", "deep.json:1: not valid JSON .*nested too deeply"),
])
def test_unreadable_files_are_one_error_naming_the_file(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataFileError, match=message) as e:
        read_file(cfg(f))
    assert name in str(e.value) and "\n" not in str(e.value)


def test_directory_missing_and_unreadable_files(tmp_path, monkeypatch):
    d = tmp_path / "data.jsonl"
    d.mkdir()
    (d / "part-0.jsonl").write_text("{}\n")
    with pytest.raises(DataFileError, match="is a directory, not a file; point it at a file inside .part-0.jsonl"):
        read_file(cfg(d))
    with pytest.raises(DataFileNotFound, match="nope.jsonl: no such file"):
        read_file(cfg(tmp_path / "nope.jsonl"))

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(sources, "open", denied, raising=False)
    with pytest.raises(DataFileError, match="part-0.jsonl: cannot be read .permission denied"):
        read_file(cfg(d / "part-0.jsonl"))


def test_rows_json_would_misread_are_bad_rows(tmp_path):
    """A key given twice (json keeps the last value without a word), nesting too deep for the parser (a
    RecursionError) and a lone surrogate escape (no tokenizer can read it) are bad rows, in JSON Lines, JSON
    arrays and csv cells alike."""
    deep = "[" * 100_000 + "]" * 100_000
    lines = ['{"prompt": "q", "chosen": "a", "rejected": "b", "rejected": "a"}', deep,
             '{"prompt": "q", "chosen": "a", "rejected": "b", "x": %s}' % deep,
             '{"prompt": "q\\ud800", "chosen": "a", "rejected": "b"}',
             '{"prompt": [{"role": "user", "content": "hi \\udc00"}], "chosen": "a", "rejected": "b"}']
    f = write_lines(tmp_path / "p.jsonl", lines)
    got = []
    for row in read_file(cfg(f)):
        with pytest.raises(BadRow) as e:
            check_row(row, cfg(f))
        got.append((row.where, e.value.reason, e.value.detail))
    assert got == [(f"{f}:1", "key given twice", "'rejected'"),
                   (f"{f}:2", "not valid JSON", "nested too deeply to parse"),
                   (f"{f}:3", "not valid JSON", "nested too deeply to parse"),
                   (f"{f}:4", "column 'prompt': not valid Unicode", "a lone surrogate \\ud800 at character 2"),
                   (f"{f}:5", "column 'prompt': not valid Unicode",
                    "message 1 content: a lone surrogate \\udc00 at character 4")]
    f = tmp_path / "p.json"
    f.write_text("[\n" + ",\n".join(lines[:1] + lines[3:]) + "\n]")
    assert [r.problem.reason if r.problem else "" for r in read_file(cfg(f))] == ["key given twice", "", ""]
    f = tmp_path / "p.csv"
    f.write_text(f'prompt,chosen,rejected\n"{deep}",a,b\n')
    assert read_file(cfg(f))[0]["prompt"] == deep                              # a text cell, kept as text


def test_a_pipe_is_refused_not_waited_on(tmp_path):
    f = tmp_path / "p.jsonl"
    os.mkfifo(f)                                                           # no writer: opening it would block
    with pytest.raises(DataFileError, match="p.jsonl: a named pipe .FIFO., not a regular file"):
        read_file(cfg(f))


def test_hub_rows_are_named_by_dataset_split_and_row(monkeypatch):
    fake = type(sys)("datasets")
    fake.load_dataset = lambda name: {"train": GOOD[:2] + [{"prompt": "q", "chosen": 1, "rejected": "b"}]}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    train, _ = load_rows(OmegaConf.structured(DatasetConfig(source="hub", path="org/prefs", eval_fraction=0.0)))
    assert sorted(r.where for r in train) == ["org/prefs train row 1", "org/prefs train row 2", "org/prefs train row 3"]


# ---------------------------------------------------------------- row checks: no coercion, per-row formats

def test_values_are_never_converted():
    q = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert reason({"prompt": "q", "chosen": "a"}) == "missing column 'rejected'"
    assert reason({**q, "rejected": None}) == "column 'rejected': null"
    assert reason({**q, "chosen": ""}) == reason({**q, "chosen": " \n"}) == "column 'chosen': empty"
    fmt, row = check_row({**q, "rejected": ""}, cfg(allow_empty_completions=True))   # generated data: a real answer
    assert fmt == "standard" and row["rejected"] == ""
    assert reason({**q, "prompt": ""}, allow_empty_completions=True) == "column 'prompt': empty"
    for value in (3, 2.5, True, {"text": "a"}, ["a", "b"]):
        assert reason({**q, "chosen": value}) == "column 'chosen': not text"
    assert reason({**q, "prompt": [{"role": "user", "content": 5}]}) == "column 'prompt': not a message list"
    assert reason({**q, "prompt": []}) == "column 'prompt': empty"
    assert reason({**q, "chosen": [{"role": "assistant", "content": "a"}]}) == \
        "column 'chosen': messages while the prompt is text"
    assert reason({"chosen": "yes", "rejected": "no"}) == "implicit prompt: no shared beginning"
    assert reason({**q, "rejected": "a"}) == "chosen identical to rejected"
    assert reason({"question": "q", "good": "a", "bad": 0}, prompt_column="question", chosen_column="good",
                  rejected_column="bad") == "column 'bad': not text"


def test_each_row_is_classified_on_its_own():
    c = cfg()
    rows = [GOOD[0], CONV, {"chosen": "Q: 1? A: 1", "rejected": "Q: 1? A: 2"}, {**CONV, "chosen": "1"}]
    assert [check_row(r, c)[0] for r in rows] == ["standard", "conversational", "implicit prompt", "conversational"]
    pairs, report = build_pairs(rows, TOK, c)
    assert report["formats"] == {"standard": 1, "conversational": 2, "implicit prompt": 1}
    assert report["format"] == "mixed" and report["kept"] == 4
    assert pairs[1].prompt == encode_pair(TOK, CONV, 512, 256).prompt                 # the template, not str()
    assert TOK.decode(pairs[1].prompt).startswith("<|system|>Be brief.")


def test_per_token_columns_are_checked_and_kept(tmp_path):
    f = tmp_path / "w.csv"
    f.write_text('prompt,chosen,rejected,chosen_weights,rejected_weights\nq,ab,c,"[0.5, 1]","[2]"\n'
                 'q,ab,c,"[0.5, ""x""]","[2]"\nq,ab,c,,[1]\n')
    c = cfg(f)
    pairs, report = build_pairs(read_file(c), TOK, c, ("weights",))
    assert pairs[0].values["weights"] == ([0.5, 1.0, 0.0], [2.0, 0.0])        # EOS gets 0
    assert report["dropped_reasons"] == {"column 'chosen_weights': not a list of numbers": 2}


def test_a_huge_field_is_cut_in_characters_before_tokenising():
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(TOK, name)

        def __call__(self, text, **kw):
            calls.append(len(text))
            return TOK(text, **kw)
    spy, row = Spy(), {"prompt": "q " * 2_000_000, "chosen": "a" * 5_000_000, "rejected": "b"}
    p = encode_pair(spy, row, 64, 32)
    assert max(calls) <= char_limit(spy, 64) < 10_000 and p.truncated == "prompt+completion"
    small = {"prompt": "q " * 3_000, "chosen": "a" * 3_000, "rejected": "b"}      # just over the limit
    assert encode_pair(TOK, small, 64, 32, limit=10 ** 9).chosen == encode_pair(TOK, small, 64, 32).chosen
    with pytest.raises(Dropped):
        encode_pair(spy, row, 64, 32, truncation="drop")


# ---------------------------------------------------------------- end to end through the CLI

def train(tmp_path, path, *extra, capsys=None):
    """(exit code, stdout, stderr, data report or None) of `midpo train` on a local file."""
    run = tmp_path / "run"
    code = 0
    try:
        main(["train", "dataset=local", f"dataset.path={path}", *TINY, *extra, f"hydra.run.dir={run}",
              f"cache_dir={tmp_path / 'cache'}"])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    report = json.loads((run / "data_report.json").read_text()) if (run / "data_report.json").exists() else None
    return code, out, err, report


def bad_file(tmp_path):
    """30 good rows with one of each bad row between them; returns (path, {reason: [lines]})."""
    q = {"prompt": "q", "chosen": "a", "rejected": "b"}
    bad = [('{"prompt": "q", "chosen": "a", ', "not valid JSON"),
           ([1, 2], "not a JSON object"),
           ({"prompt": "q", "chosen": "a"}, "missing column 'rejected'"),
           ({**q, "rejected": None}, "column 'rejected': null"),
           ({**q, "chosen": ""}, "column 'chosen': empty"),
           ({**q, "chosen": 3}, "column 'chosen': not text"),
           ({**q, "rejected": False}, "column 'rejected': not text"),
           ({**q, "prompt": {"text": "q"}}, "column 'prompt': not text"),
           ({**q, "prompt": ["q", "r"]}, "column 'prompt': not text"),
           ({**q, "prompt": [{"role": "user", "content": 1}]}, "column 'prompt': not a message list"),
           ({**q, "rejected": "a"}, "chosen identical to rejected"),
           ({**q, "chosen": "x" * 100 + "A", "rejected": "x" * 100 + "B"}, "chosen identical to rejected after truncation")]
    lines, where = [], {}
    for i, good in enumerate(GOOD):
        lines.append(good)
        if i == 4:
            lines.append("")                                               # a blank line: skipped, not counted
        if i % 2 and bad:
            row, why = bad.pop(0)
            lines.append(row)
            where.setdefault(why, []).append(len(lines))
    return write_lines(tmp_path / "bad.jsonl", lines), where


def test_bad_rows_are_dropped_and_counted_with_their_lines(tmp_path, capsys):
    path, where = bad_file(tmp_path)
    code, out, err, (report, _) = train(tmp_path, path, "dataset.max_bad_fraction=0.5", capsys=capsys)
    assert code == 0, err
    assert report["rows_read"] == 42 and report["kept"] == 30 and report["bad"] == report["dropped"] == 12
    assert report["dropped_reasons"] == {k: len(v) for k, v in where.items()}
    for why, lines in where.items():
        assert [e.split(" (")[0] for e in report["dropped_examples"][why]] == [f"{path}:{n}" for n in lines]
    assert report["dropped_examples"]["not valid JSON"][0].startswith(f"{path}:{where['not valid JSON'][0]} (Expecting")
    assert "dropped 12 of 42 rows are bad" in " ".join(out.split())             # the warning, besides the report


def test_too_many_bad_rows_fail_after_the_report(tmp_path, capsys):
    path, _ = bad_file(tmp_path)
    code, _, err, report = train(tmp_path, path, capsys=capsys)                   # default max_bad_fraction=0.1
    assert code == 1 and report is not None
    assert "12 of 42 rows are bad (28.6%)" in err and "dataset.max_bad_fraction=0.1" in err


def test_on_bad_rows_error_names_the_first_bad_row(tmp_path, capsys):
    path, where = bad_file(tmp_path)
    code, _, err, report = train(tmp_path, path, "dataset.on_bad_rows=error", capsys=capsys)
    assert code == 1 and report is None
    assert f"bad.jsonl:{where['not valid JSON'][0]}: not valid JSON (Expecting" in err and "on_bad_rows" in err
    assert len(err.strip().splitlines()) == 1 or "error:" in err.splitlines()[0]
    lines = [r for r in GOOD] + [{"prompt": "q", "chosen": "a", "rejected": None}]
    code, _, err, _ = train(tmp_path / "2", write_lines(tmp_path / "null.jsonl", lines), "dataset.on_bad_rows=error",
                            capsys=capsys)
    assert code == 1 and "null.jsonl:31: column 'rejected': null" in err


def test_on_bad_rows_error_after_truncation(tmp_path, capsys):
    lines = GOOD + [{"prompt": "q", "chosen": "x" * 100 + "A", "rejected": "x" * 100 + "B"}]
    code, _, err, _ = train(tmp_path, write_lines(tmp_path / "t.jsonl", lines), "dataset.on_bad_rows=error",
                            capsys=capsys)
    assert code == 1 and "t.jsonl:31: chosen identical to rejected after truncation" in err
    code, _, err, _ = train(tmp_path / "x", tmp_path / "t.jsonl", "dataset.on_bad_rows=maybe", capsys=capsys)
    assert code == 1 and "dataset.on_bad_rows='maybe' is not one of" in err


def test_mixed_formats_train_each_row_in_its_own_format(tmp_path, capsys):
    rows = GOOD[:10] + [CONV] * 10 + [{"chosen": f"Q: {i}? A: {i}", "rejected": f"Q: {i}? A: no"} for i in range(10)]
    code, out, err, (report, _) = train(tmp_path, write_lines(tmp_path / "mixed.jsonl", rows), capsys=capsys)
    assert code == 0, err
    assert report["formats"] == {"standard": 10, "conversational": 10, "implicit prompt": 10}
    assert report["kept"] == 30 and report["format"] == "mixed"
    assert report["format_examples"]["implicit prompt"][0] == f"{tmp_path / 'mixed.jsonl'}:21"


def test_rows_the_tokenizer_cannot_read_are_dropped_not_a_traceback(tmp_path, capsys):
    lines = [json.dumps(r) for r in GOOD] + ['{"prompt": "q\\ud800", "chosen": "a", "rejected": "b"}',
                                             '{"prompt": "q", "chosen": "a", "rejected": "b", "chosen": "b"}']
    f = tmp_path / "s.jsonl"
    f.write_text("\n".join(lines) + "\n")
    code, _, err, (report, _) = train(tmp_path, f, capsys=capsys)
    assert code == 0, err
    assert report["dropped_reasons"] == {"column 'prompt': not valid Unicode": 1, "key given twice": 1}
    code, _, err, _ = train(tmp_path / "2", f, "dataset.on_bad_rows=error", capsys=capsys)
    assert code == 1 and "s.jsonl:31: column 'prompt': not valid Unicode (a lone surrogate \\ud800" in err


def test_a_huge_line_is_truncated_not_tokenised_whole(tmp_path, capsys):
    lines = GOOD + [{"prompt": "Say a lot.", "chosen": "word " * 400_000, "rejected": "no"}]      # a 2 MB line
    code, _, err, (report, _) = train(tmp_path, write_lines(tmp_path / "big.jsonl", lines), capsys=capsys)
    assert code == 0, err
    assert report["kept"] == 31 and report["truncated_reasons"] == {"completion truncated to fit": 1}
    assert report["truncated_examples"]["completion truncated to fit"] == [f"{tmp_path / 'big.jsonl'}:31"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "the file is empty"),
    ("random.jsonl", random.Random(0).randbytes(4096), "a binary file"),
    ("zipped.jsonl", gzip.compress(b'{"prompt": "q"}\n'), "gzip-compressed"),
    ("data.jsonl", None, "is a directory, not a file"),
    ("broken.json", b'[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": }]', "broken.json:2: not valid JSON"),
    ("prefs.txt", b"{}", "unsupported extension"),
])
def test_unreadable_files_exit_1_with_one_line(tmp_path, capsys, name, content, message):
    f = tmp_path / name
    f.mkdir() if content is None else f.write_bytes(content)
    code, _, err, _ = train(tmp_path, f, capsys=capsys)
    assert code == 1 and message in err and name in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_an_eval_fraction_that_holds_out_nothing_says_so(tmp_path, caplog):
    """Five rows at eval_fraction=0.1 hold out none: the run has no eval/* metrics, and a warning says why."""
    path = tmp_path / "five.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:5]))

    def with_fraction(f):
        return OmegaConf.structured(DatasetConfig(source="local", path=str(path), eval_fraction=f))

    train, evals = load_rows(with_fraction(0.1))
    assert (len(train), len(evals)) == (5, 0)
    assert "holds out no row" in caplog.text and "dataset.eval_split" in caplog.text
    caplog.clear()
    train, evals = load_rows(with_fraction(0.4))
    assert (len(train), len(evals)) == (3, 2) and "holds out no row" not in caplog.text
