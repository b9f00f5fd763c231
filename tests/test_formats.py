"""TRL's three dataset shapes train from local files, and the data report counts what happened."""
import json

from midpo_cli.__main__ import main
from midpo_cli.data.prepare import split_implicit

TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.save_model=false",
        "dataset.eval_fraction=0.2"]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_on(tmp_path, path, *extra):
    run = tmp_path / "run"
    main(["train", "dataset=local", f"dataset.path={path}", *TINY, *extra, f"hydra.run.dir={run}"])
    return json.loads((run / "data_report.json").read_text())


def test_conversational_with_system_messages(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}"}],
             "chosen": [{"role": "assistant", "content": f"{i}"}],
             "rejected": [{"role": "assistant", "content": f"I will say {i + 1}"}]} for i in range(20)]
    train, ev = train_on(tmp_path, write(tmp_path / "conv.jsonl", rows))
    assert train["format"] == "conversational" and train["rows_read"] == 16 and train["kept"] == 16
    assert ev["rows_read"] == 4 and train["dropped"] == 0


def test_implicit_prompt_strings_and_messages(tmp_path):
    rows = [{"chosen": f"Q: {i}+1? A: {i + 1}", "rejected": f"Q: {i}+1? A: {i + 2}"} for i in range(15)]
    rows += [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
              "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}] * 5
    train, ev = train_on(tmp_path, write(tmp_path / "implicit.jsonl", rows))
    assert train["format"] == "implicit prompt" and train["kept"] + ev["kept"] == 20
    assert split_implicit("Q: 2+1? A: 3", "Q: 2+1? A: 4") == ("Q: 2+1? A:", " 3", " 4")


def test_report_counts_dropped_and_truncated(tmp_path):
    rows = [{"prompt": "p" * 10, "chosen": "a", "rejected": "b"} for _ in range(10)]
    rows += [{"prompt": "same", "chosen": "x", "rejected": "x"}] * 5                 # identical: dropped
    rows += [{"prompt": "q" * 100, "chosen": "c" * 80, "rejected": "r"}] * 5        # too long
    # 5 of 20 rows bad is over the default max_bad_fraction=0.1: allow it here
    train, ev = train_on(tmp_path, write(tmp_path / "mixed.jsonl", rows), "dataset.max_length=60",
                         "dataset.max_prompt_length=40", "dataset.eval_fraction=0.0", "dataset.max_bad_fraction=0.3")
    assert train["rows_read"] == 20 and train["kept"] == 15 and train["dropped"] == 5
    assert train["dropped_reasons"] == {"chosen identical to rejected": 5} and train["bad"] == 5
    assert train["dropped_examples"]["chosen identical to rejected"][0].endswith("mixed.jsonl:11")
    assert train["truncated"] == 5 and train["truncated_reasons"] == {"prompt+completion truncated to fit": 5}
    train, _ = train_on(tmp_path / "drop", write(tmp_path / "mixed2.jsonl", rows), "dataset.max_length=60",
                        "dataset.max_prompt_length=40", "dataset.eval_fraction=0.0", "dataset.truncation=drop",
                        "dataset.max_bad_fraction=0.3")
    assert train["kept"] == 10 and train["dropped"] == 10 and train["truncated"] == 0
    assert train["bad"] == 5                      # pairs truncation=drop skips are a policy, not bad data


def test_column_mapping(tmp_path):
    rows = [{"question": f"q{i}", "good": f"g{i}", "bad": f"b{i}"} for i in range(10)]
    train, _ = train_on(tmp_path, write(tmp_path / "m.jsonl", rows), "dataset.prompt_column=question",
                        "dataset.chosen_column=good", "dataset.rejected_column=bad")
    assert train["kept"] == 8
