"""Broken local model directories (`model=hf model.name_or_path=DIR`) fail in one line that names the
directory and the file, with exit code 1 and no traceback; before the run directory is claimed (so none is
left behind) whenever the files' headers show the damage. Valid directories train a step.

Tiny models are built from configs and saved in code (no download), then each test copy is damaged one way.
"""
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from midpo_cli.__main__ import main
from midpo_cli.engine.models import byte_tokenizer

DATA = Path(__file__).parent / "data" / "standard.jsonl"
ONE_STEP = ["dataset=local", f"dataset.path={DATA}", "trainer.max_steps=1", "trainer.batch_size=4",
            "trainer.eval_every=0"]
RUN = ["model=hf", *ONE_STEP, "trainer.save_model=false", "model.dtype=float32"]
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
SHARD = "model-00002-of-00003.safetensors"        # the middle shard of llama-sharded
AUTO = {"AutoConfig": "configuration_gpt17.Gpt17Config", "AutoModelForCausalLM": "modeling_gpt17.Gpt17ForCausalLM"}
GGUF = ["model.gguf_file=m.gguf"]


def save(folder: Path, kind: str, dtype=torch.float32, shard: str = "5GB", **size) -> None:
    tok = byte_tokenizer()
    torch.manual_seed(0)
    conf = AutoConfig.for_model(kind, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **size)
    AutoModelForCausalLM.from_config(conf).to(dtype).save_pretrained(folder, max_shard_size=shard)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save(root / "gpt2", "gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=512)
    save(root / "qwen2", "qwen2", **SIZE)
    save(root / "llama-sharded", "llama", shard="50KB", tie_word_embeddings=True, **SIZE)
    save(root / "llama-bf16", "llama", dtype=torch.bfloat16, **SIZE)
    shutil.copytree(root / "gpt2", root / "gpt2-bin")                 # the same weights as torch.save writes them
    weights = root / "gpt2-bin" / "model.safetensors"
    torch.save(load_file(weights), root / "gpt2-bin" / "pytorch_model.bin")
    weights.unlink()
    assert (root / "llama-sharded" / SHARD).is_file()
    return root


# ----- damages: each takes the copied directory ---------------------------------------------------------------

def remove(*names):
    return lambda d: [(d / n).unlink() for n in names]


def write(name, data):
    return lambda d: (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def cut(name, keep=None):
    """Keep the first `keep` bytes of a file (half when None): a copy or download cut short."""
    def damage(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2 if keep is None else keep])
    return damage


def scribble(name, at, data):
    def damage(d):
        old = (d / name).read_bytes()
        (d / name).write_bytes(old[:at] + data + old[at + len(data):])
    return damage


def edit_config(**changes):
    """config.json with keys changed (None: removed)."""
    def damage(d):
        conf = json.loads((d / "config.json").read_text())
        conf.update(changes)
        (d / "config.json").write_text(json.dumps({k: v for k, v in conf.items() if v is not None}))
    return damage


def append(name, data):
    def damage(d):
        with (d / name).open("ab") as f:
            f.write(data)
    return damage


def rename(old, new):
    return lambda d: (d / old).rename(d / new)


# (id, directory copied, damage, words the line must hold, found before the claim, extra overrides)
BROKEN = [
    ("config missing", "gpt2", remove("config.json"), ["has no config.json"], True, []),
    ("config not JSON", "gpt2", write("config.json", "{oops"), ["config.json is not valid JSON"], True, []),
    ("config a list", "gpt2", write("config.json", "[1, 2]"), ["config.json holds a JSON list"], True, []),
    ("config no model_type", "gpt2", edit_config(model_type=None), ['config.json has no "model_type"'], True, []),
    ("config unknown model_type", "gpt2", edit_config(model_type="gpt17"),
     ['config.json\'s model_type "gpt17"', "no auto_map"], True, []),
    ("custom code untrusted", "gpt2", edit_config(model_type="gpt17", auto_map=AUTO),
     ["config.json", "model.trust_remote_code=true", "only for code you trust"], True, []),
    ("custom code missing", "gpt2", edit_config(model_type="gpt17", auto_map=AUTO),
     ["configuration_gpt17.py is not in"], True, ["model.trust_remote_code=true"]),
    ("no weights", "gpt2", remove("model.safetensors"),
     ["no weights in", "model.safetensors,", "model.safetensors.index.json", "pytorch_model.bin"], True, []),
    ("safetensors truncated", "gpt2", cut("model.safetensors"), ["model.safetensors is truncated"], True, []),
    ("safetensors cut in header", "gpt2", cut("model.safetensors", 100), ["model.safetensors is truncated"], True, []),
    ("safetensors cut in length", "gpt2", cut("model.safetensors", 5), ["model.safetensors is truncated"], True, []),
    ("safetensors empty", "gpt2", cut("model.safetensors", 0), ["model.safetensors is empty"], True, []),
    ("safetensors is text", "gpt2", write("model.safetensors", "these are not weights\n"),
     ["model.safetensors is not a safetensors file", "text"], True, []),
    ("safetensors is a pickle", "gpt2-bin", rename("pytorch_model.bin", "model.safetensors"),
     ["model.safetensors is not a safetensors file", "torch.save"], True, []),
    ("safetensors is an LFS pointer", "gpt2", write("model.safetensors", "version https://git-lfs.github.com/spec/v1\n"),
     ["model.safetensors is not a safetensors file", "git lfs pull"], True, []),
    ("safetensors header damaged", "gpt2", scribble("model.safetensors", 8, b"#" * 16),
     ["model.safetensors has a damaged header"], True, []),
    ("safetensors extra bytes", "gpt2", append("model.safetensors", bytes(10)),
     ["model.safetensors is damaged", "10 bytes more"], True, []),
    ("shard missing", "llama-sharded", remove(SHARD), [f"model.safetensors.index.json names the shard {SHARD}"],
     True, []),
    ("shard truncated", "llama-sharded", cut(SHARD), [f"{SHARD} (a shard model.safetensors.index.json names) is "
                                                      "truncated"], True, []),
    ("index not JSON", "llama-sharded", cut("model.safetensors.index.json", 40),
     ["model.safetensors.index.json is not valid JSON"], True, []),
    ("index without weight_map", "llama-sharded", write("model.safetensors.index.json", '{"metadata": {}}'),
     ['model.safetensors.index.json has no "weight_map"'], True, []),
    ("bin truncated", "gpt2-bin", cut("pytorch_model.bin"), ["pytorch_model.bin is truncated"], True, []),
    ("bin is text", "gpt2-bin", write("pytorch_model.bin", "not a checkpoint"),
     ["pytorch_model.bin is not a PyTorch checkpoint"], True, []),
    ("no tokenizer", "qwen2", remove("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
     ["holds no tokenizer", "tokenizer.json, tokenizer.model", "vocab.json + merges.txt", "vocab.txt",
      "save_pretrained"], True, []),
    ("tokenizer.json truncated", "gpt2", cut("tokenizer.json"), ["tokenizer.json is not valid JSON"], True, []),
    ("tokenizer_config.json not JSON", "gpt2", write("tokenizer_config.json", "{oops"),
     ["tokenizer_config.json is not valid JSON"], True, []),
    ("special_tokens_map.json not JSON", "gpt2", write("special_tokens_map.json", "{"),
     ["special_tokens_map.json is not valid JSON"], True, []),
    ("gguf empty", "gpt2", write("m.gguf", b""), ["model.gguf_file=m.gguf is empty"], True, GGUF),
    ("gguf is text", "gpt2", write("m.gguf", "hello"), ["model.gguf_file=m.gguf is not a GGUF file"], True, GGUF),
    ("gguf cut in header", "gpt2", write("m.gguf", b"GGUF\x03\x00\x00\x00\x01"),
     ["model.gguf_file=m.gguf is truncated"], True, GGUF),
    ("gguf header damaged", "gpt2", write("m.gguf", b"GGUF" + (99).to_bytes(4, "little") + bytes(116)),
     ["model.gguf_file=m.gguf has a damaged header"], True, GGUF),
    # found only by loading: one line all the same, the run directory holds error.json
    ("shapes do not fit config", "gpt2", edit_config(n_embd=64),
     ["the weights do not fit config.json", "transformer.", "[", "save them together"], False, []),
    ("tokenizer.json not JSON inside", "gpt2", write("tokenizer.json", "{oops}"),   # its ends look whole: parsed
     ["tokenizer.json is not valid JSON"], False, []),                                 # only once loading fails
    ("tokenizer.json not a tokenizer", "gpt2", write("tokenizer.json", "{}"),
     ["could not load the tokenizer", "tokenizer.json"], False, []),
    ("config the model refuses", "gpt2", edit_config(n_head=5),
     ["could not load the model", "config.json", "divisible"], False, []),
]


def fails(capsys, args) -> str:
    """Run `midpo train *args` in-process: exit 1, one `error:` line on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1, err
    assert "Traceback" not in err and "\n" not in err and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("base, damage, words, pre_claim, extra",
                         [pytest.param(*case[1:], id=case[0]) for case in BROKEN])
def test_broken_model_directory_is_one_line(saved, tmp_path, capsys, base, damage, words, pre_claim, extra):
    folder = tmp_path / "model"
    shutil.copytree(saved / base, folder)
    damage(folder)
    run = tmp_path / "run"
    err = fails(capsys, [*RUN, f"model.name_or_path={folder}", *extra, f"hydra.run.dir={run}"])
    assert f"model.name_or_path={folder}" in err
    for word in words:
        assert word in err, (word, err)
    if pre_claim:
        assert not run.exists(), "a refused model directory left a run directory behind"
    else:
        assert (run / "error.json").is_file()


def test_unreadable_weights_are_one_line(saved, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(saved / "gpt2", folder)
    target = folder / "model.safetensors"
    if os.geteuid() == 0:                         # root reads any file: refuse it as the kernel would anyone else
        real = Path.open

        def refuse(self, *args, **kwargs):
            if self == target:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(Path, "open", refuse)
    else:
        target.chmod(0)
    run = tmp_path / "run"
    err = fails(capsys, [*RUN, f"model.name_or_path={folder}", f"hydra.run.dir={run}"])
    assert f"model.name_or_path={folder}: cannot read model.safetensors" in err and "Permission denied" in err
    assert not run.exists()


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")
def test_truncated_gguf_is_one_line(tmp_path, capsys):
    """A GGUF whose header is whole but whose tensors are cut short: found by loading, named all the same."""
    import gguf
    import numpy as np

    folder = tmp_path / "model"
    folder.mkdir()
    logging.getLogger("gguf").setLevel(logging.WARNING)    # its plan, logged at INFO, is not this test's output
    writer = gguf.GGUFWriter(folder / "m.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cut("m.gguf", 2000)(folder)
    run = tmp_path / "run"
    err = fails(capsys, [*RUN, f"model.name_or_path={folder}", *GGUF, f"hydra.run.dir={run}"])
    assert f"model.name_or_path={folder}" in err and "model.gguf_file=m.gguf" in err and "damaged or cut short" in err


def test_no_traceback_in_a_real_process(saved, tmp_path):
    """The same, as a user sees it: a separate process, stderr holding one line."""
    folder = tmp_path / "model"
    shutil.copytree(saved / "gpt2", folder)
    cut("model.safetensors")(folder)
    r = subprocess.run([sys.executable, "-m", "midpo_cli", "train", *RUN, f"model.name_or_path={folder}",
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "model.safetensors is truncated" in r.stderr, r.stderr


@pytest.mark.parametrize("base, extra", [("gpt2", []), ("qwen2", []), ("llama-sharded", []), ("gpt2-bin", []),
                                         ("llama-bf16", ["model.dtype=bfloat16"])])
def test_valid_directories_train(saved, tmp_path, base, extra):
    run = tmp_path / "run"
    main(["train", *RUN, f"model.name_or_path={saved / base}", *extra, f"hydra.run.dir={run}"])
    assert json.loads((run / "results.json").read_text())["final"]["loss"] > 0


def test_a_lora_merged_run_model_trains(tmp_path):
    """`<run>/model` of a LoRA run (adapters merged, tied embeddings of the tiny model) is a valid directory."""
    first = tmp_path / "lora"
    main(["train", *ONE_STEP, "model.lora.r=4", f"hydra.run.dir={first}"])
    second = tmp_path / "again"
    main(["train", *RUN, f"model.name_or_path={first / 'model'}", f"hydra.run.dir={second}"])
    assert (second / "results.json").is_file()


def test_renamed_tensors_are_not_loaded_as_random_values(saved, tmp_path, capsys):
    """Weights under other tensor names: transformers would start those tensors from random values (its warning is
    hidden by the quiet log); midpo refuses in one line naming a missing tensor."""
    folder = tmp_path / "model"
    shutil.copytree(saved / "qwen2", folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k.replace("layers.0.", "blocks.0."): v for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    err = fails(capsys, [*RUN, f"model.name_or_path={folder}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert "lack" in err and "layers.0." in err and "random values" in err and "blocks.0." in err
