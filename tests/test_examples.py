"""The main job end to end (small), and multi-process training with torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_trains_every_model_and_writes_results(tmp_path, capsys):
    from homotopy_zoo import training as train_classifier

    results = train_classifier.main([
        "--epochs", "1", "--train-size", "256", "--test-size", "128", "--width", "8",
        "--out", str(tmp_path)])
    assert [r["model"] for r in results] == ["homoode", "deq", "deq-homotopy", "node", "anode"]
    assert [r["label"] for r in results][1:3] == ["deq (anderson)", "deq (homotopy)"]
    printed = capsys.readouterr().out
    assert "deq (homotopy) epoch 1/1: train loss" in printed       # a log line per epoch
    assert f"results: {tmp_path.resolve()}/<model>/results.json" in printed
    for r in results:
        saved = json.loads((tmp_path / r["model"] / "results.json").read_text())
        assert 0.0 <= saved["test_acc"] <= 1.0 and saved["nfe_forward"] > 0
        assert saved["params"] > 0 and saved["images_per_s"] > 0 and saved["peak_memory_mb"] > 0
        assert (tmp_path / r["model"] / "checkpoint.pt").exists()
    assert (tmp_path / "training_curves.png").exists()
    # --resume continues from the checkpoint: the finished epoch is not trained again.
    again = train_classifier.main([
        "--epochs", "1", "--train-size", "256", "--test-size", "128", "--width", "8",
        "--out", str(tmp_path), "--model", "homoode", "--resume", "--no-plots"])
    assert again[0]["wall_time_s"] == 0.0 and again[0]["history"] == results[0]["history"]


def test_missing_torchvision_dataset_names_the_fix(tmp_path, monkeypatch):
    import torchvision

    from homotopy_zoo.data import load_image_data

    def offline(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(RuntimeError, match="--data-dir"):
        load_image_data("cifar10", tmp_path)


SOCKET_RACES = ("Address already in use", "DistNetworkError", "Connection reset by peer",
                "Connection closed by peer")


@pytest.mark.parametrize("model", ["homoode", "deq"])
def test_torchrun_two_processes_end_with_identical_parameters(tmp_path, model):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "train_classifier.py"), "--model", model, "--epochs", "1",
           "--max-steps", "3", "--batch-size", "16", "--width", "8", "--train-size", "128",
           "--test-size", "64", "--device", "cpu", "--no-plots", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    if done.returncode and any(sign in done.stderr for sign in SOCKET_RACES):
        # A free port picked by the launcher can be taken before the workers bind it;
        # that is the machine's, not the training's, failure: run once more.
        done = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, f"torchrun exited {done.returncode}:\n{done.stderr[-6000:]}"
    result = json.loads((tmp_path / model / "results.json").read_text())
    assert result["world_size"] == 2
    first, second = result["rank_param_checksums"]
    assert first == second


def test_every_readme_python_block_runs():
    """Users copy README's code: every ```python block must run as written."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    for block in blocks:
        torch.manual_seed(0)
        exec(compile(block, "README.md", "exec"), {})


def test_saved_tensor_memory_counts_each_storage_once():
    from homotopy_zoo import training as train_classifier

    a = torch.randn(100, requires_grad=True)
    b = torch.randn(100, requires_grad=True)
    saved = train_classifier.SavedTensors()
    with saved:
        (a * b).sum()                        # mul saves a and b: 2 x 400 bytes
    assert saved.peak == 800
    with saved:
        (a * a).sum()                        # the same storage twice: 400 bytes
    assert saved.peak == 800                 # the largest step is kept
    fresh = train_classifier.SavedTensors()
    with fresh:
        (a * a).sum()
    assert fresh.peak == 400


def test_saved_tensor_measurement_frees_graphs_that_never_run_backward():
    """A graph built under the measurement and never differentiated (a rejected ODE step,
    the adjoint's retained vector-Jacobian graphs) must be freed by reference counting
    alone: the packed tensors may not point back at their own nodes."""
    import gc
    import weakref

    from homotopy_zoo import training as train_classifier

    x = torch.randn(100, requires_grad=True)
    gc.disable()
    try:
        with train_classifier.SavedTensors():
            y = x.exp()                        # exp saves its own output
            freed = weakref.ref(y)
            del y
        assert freed() is None
    finally:
        gc.enable()


def test_unstable_deq_example_trains_and_reports_residuals(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("unstable_deq",
                                                  ROOT / "examples" / "unstable_deq.py")
    unstable_deq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unstable_deq)
    rows = unstable_deq.main(["--seeds", "0", "--epochs", "1", "--solvers", "fixed_point_iter",
                              "homotopy", "--out", str(tmp_path)])
    assert [r["solver"] for r in rows] == ["fixed_point_iter", "homotopy"]
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["solved_fraction"] <= 1.0
        assert len(r["residuals"]) == 24 and all(x >= 0 for x in r["residuals"])
    assert (tmp_path / "residuals.png").exists() and (tmp_path / "results.json").exists()


def test_path_cost_counts_a_path_finished_only_where_it_stays_at_lambda_one():
    """``benchmarks/path_cost.py`` measures a path from its first λ < 1 to the evaluation
    from which it stays at λ = 1. A point predicted past λ = 1 and rejected by its corrector
    (the first sample's fourth column) does not finish it; a path that ends the solve below
    λ = 1 is unfinished; a sample that never left λ = 1 ran no path."""
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("path_cost", bench / "path_cost.py")
    path_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(path_cost)
    lam = torch.tensor([[1.0, 0.2, 0.6, 1.0, 0.9, 1.0, 1.0],
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                        [1.0, 0.5, 1.0, 0.7, 0.8, 0.9, 0.95]])
    nfe = [1, 2, 5, 9, 14, 20, 27]
    assert path_cost.path_costs({"lam_trace": lam, "trace_nfe": nfe}) == [20.0 - 2.0, None]
