"""A training step reads the device once: its metrics (every micro-batch's, the prior's scalars and the gradient
norms) leave the device in one transfer, which the non-finite guard needs anyway; nothing else in midpo's own
code waits on the device mid-step. Counted on the CPU by wrapping the tensor methods that move a value to the
host, for calls made from midpo_cli's code during steps after the first (whose packed self-check reads once)."""
import sys

import pytest
import torch

from midpo_cli.__main__ import main
from midpo_cli.recipe import Recipe

READS = ("item", "tolist", "__float__", "__bool__", "__int__", "numpy")


@pytest.mark.parametrize("prior", ["dpo", "learned_tilt", "sparsepo"])
def test_a_step_reads_the_device_once_whatever_the_micro_batches(prior, tmp_path, fast, monkeypatch):
    counts, now = {}, [0]
    original_step = Recipe.step

    def step(self, number, signals):
        now[0] = number
        try:
            return original_step(self, number, signals)
        finally:
            now[0] = 0

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if now[0] > 1 and "midpo_cli" in sys._getframe(1).f_code.co_filename:
                counts[now[0]] = counts.get(now[0], 0) + 1
            return original(self, *args, **kwargs)
        return read

    monkeypatch.setattr(Recipe, "step", step)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    main(["train", *fast, f"prior={prior}", "trainer.grad_accum=3", "trainer.batch_size=4", "trainer.max_steps=3",
          "trainer.save_model=false", f"hydra.run.dir={tmp_path / 'run'}"])
    assert counts == {2: 1, 3: 1}
