"""The main job's embedded default runs end to end and trains."""
import pytest

from sparseadapter.cli import main
from sparseadapter.demo import DemoConfig, run_demo


def test_demo_trains_the_sparse_layer():
    result = run_demo(DemoConfig(in_features=96, out_features=16, tokens=512, steps=40, sparsity=0.8))
    assert result["loss_last"] < 0.95 * result["loss_first"]
    assert result["loss_held_out"] < result["loss_predict_zero"]
    assert result["sparse_forward_ms"] > 0 and result["dense_forward_ms"] > 0


def test_cli_rejects_bad_sparsity(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--sparsity", "1.5"])
    assert exc.value.code == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
