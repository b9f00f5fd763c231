"""benchmarks/vs_trl.py at toy sizes (--smoke): every mode runs, and midpo's DPO losses are TRL's, step for step."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py"
MODES = {"trl", "trl_precompute", "midpo_dpo", "midpo_dpo_padded", "midpo_dpo_cached", "midpo_tdpo"}


@pytest.mark.slow
def test_vs_trl_smoke_runs_every_mode_and_the_dpo_losses_agree(tmp_path):
    """lr 1e-3 moves the loss off log 2 by more than 1e-3 in two steps, so agreeing within 1e-4 means the same
    batches, order and updates (at the default 1e-5 the loss moves by ~1e-4 only)."""
    pytest.importorskip("trl")
    out = tmp_path / "vs_trl.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--lr", "1e-3", "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    builtin = json.loads(out.read_text())["datasets"]["builtin"]
    assert set(builtin["modes"]) == MODES
    assert set(builtin["loss_agreement"]) == {"midpo_dpo", "midpo_dpo_padded", "midpo_dpo_cached"}
    assert max(builtin["loss_agreement"].values()) < 1e-4, builtin["loss_agreement"]
    trl = builtin["modes"]["trl"]["losses"]
    assert len(trl) == 3 and abs(trl[-1] - 0.6931472) > 1e-3, trl
    for mode in MODES:
        r = builtin["modes"][mode]
        assert len(r["times"]) == 3 and r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mb"] > 0, mode
    assert "midpo_dpo vs trl" in builtin["ratios"] and 0 < builtin["padding_share"] < 1
