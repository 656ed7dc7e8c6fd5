"""``pnjax images``: protocols, initialization, the summary, and resumption after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pnjax.experiments import images as ex
from pnjax.experiments.images_cli import add_images_command  # noqa: F401 - importable

ROOT = Path(__file__).resolve().parents[1]
_CANDIDATES = [
    Path(os.environ.get("PNJAX_SHARED_DATA", "/nonexistent")),
    ROOT.parent / "shared" / "data",
    ROOT.parent.parent / "shared" / "data",
]
CIFAR_TAR = next((p / "cifar10-jpeg.tar.gz" for p in _CANDIDATES if (p / "cifar10-jpeg.tar.gz").is_file()), None)  # fmt: skip


def test_protocols_paper_is_design_section_4_and_overrides_apply():
    p = ex.get_protocol("paper", "lenet5", "full")
    assert (p.lam, p.batch_size, p.lr, p.init_std, p.iterations + 1) == (0.01, 256, 1e-3, 0.2, 20)
    p = ex.get_protocol("paper", "lenet5", "partial")
    assert (p.lam, p.epochs, p.batch_size, p.init_std) == (0.001, 150, 256, None)
    p = ex.get_protocol("paper", "alexnet", "partial")
    assert (p.epochs, p.batch_size) == (150, 128)
    p = ex.get_protocol("paper", "resnet18", "partial")
    assert (p.epochs, p.batch_size, p.augment) == (350, 128, True)
    p = ex.get_protocol("cpu", "lenet5", "full", init_std=0.05, epochs=3, lam=None)
    assert (p.init_std, p.epochs, p.lam) == (0.05, 3, 0.01)
    assert ex.get_protocol("cpu", "lenet5", "full", init_std=0).init_std is None
    with pytest.raises(ValueError, match="no protocol"):
        ex.get_protocol("gpu", "lenet5", "full")


def test_redraw_init_pytorch_default_and_normal():
    from pnjax.models import LeNet5

    x = np.zeros((1, 32, 32, 3), np.float32)
    params = jax.jit(LeNet5().init)(jax.random.key(0), x)["params"]
    torch_like = jax.jit(lambda p, k: ex.redraw_init(p, k, None))(params, jax.random.key(1))
    for name, layer in torch_like.items():
        fan_in = int(np.prod(layer["kernel"].shape[:-1]))
        bound = 1 / np.sqrt(fan_in)
        for leaf in (layer["kernel"], layer["bias"]):
            assert np.abs(leaf).max() <= bound + 1e-7, name
        # uniform on [-b, b]: the largest draw of the kernel comes close to the bound
        assert np.abs(layer["kernel"]).max() > 0.8 * bound
        assert np.abs(layer["bias"]).max() > 0  # biases are drawn too (PyTorch), not zero
    normal = jax.jit(lambda p, k: ex.redraw_init(p, k, 0.2))(params, jax.random.key(1))
    k = np.asarray(normal["Dense_0"]["kernel"])
    assert abs(k.std() - 0.2) < 0.01 and abs(k.mean()) < 0.01


def test_summary_is_paired_by_seed():
    def run(seed, method, plain, champ, c):
        hist = [{"test_acc": plain}] + [{"test_acc": champ}] * 2
        return {"seed": seed, "method": method, "champion_iteration": c, "history": hist}

    s = ex.summarize([run(0, "persistent", 0.5, 0.6, 1), run(1, "persistent", 0.7, 0.7, 2),
                      run(0, "restarts", 0.5, 0.5, 0)])  # fmt: skip
    g = s["persistent"]["gain"]
    assert g["mean"] == pytest.approx(0.05) and g["se"] == pytest.approx(0.05)
    assert s["persistent"]["champion_test_acc"]["mean"] == pytest.approx(0.65)
    assert s["restarts"]["gain"]["mean"] == 0 and s["restarts"]["gain"]["se"] is None


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """pnjax's prepared CIFAR-10 of 3 real JPEG images per class and split."""
    if CIFAR_TAR is None:
        pytest.skip("cifar10-jpeg.tar.gz not at hand")
    from pnjax.data import prepare

    d = tmp_path_factory.mktemp("cifar")
    with tarfile.open(CIFAR_TAR) as tar:
        members = [
            m for m in tar.getmembers() if m.name.endswith(("0000.jpg", "0001.jpg", "0002.jpg"))
        ]
        tar.extractall(d / "src", members=members, filter="data")
    prepare("cifar10", d / "src", d / "tfds")
    return d / "tfds"


def _images(data_dir: Path, out: Path, cache: Path, stderr) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache))  # fmt: skip
    args = ["-m", "pnjax.cli", "images", "--model", "lenet5", "--mode", "partial", "--seeds", "0",
            "--methods", "persistent", "restarts", "--iterations", "1", "--epochs", "1",
            "--batch-size", "10", "--data-dir", str(data_dir), "--out", str(out)]  # fmt: skip
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)  # fmt: skip


@pytest.mark.slow
def test_images_run_resumes_after_sigkill_and_equals_an_uninterrupted_run(tiny_cifar, tmp_path):
    cache = tmp_path / "jax-cache"
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        proc = _images(tiny_cifar, tmp_path / "a", cache, err)
        deadline = time.time() + 600
        while "persistent: run 1/2" not in log.read_text():  # iteration 0 is checkpointed
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.time() < deadline, "no progress in 10 minutes"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "a" / "results.json").exists()

    resumed = _images(tiny_cifar, tmp_path / "a", cache, subprocess.PIPE)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "persistent: run 1/2 (from checkpoint)" in err
    ref = _images(tiny_cifar, tmp_path / "b", cache, subprocess.PIPE)
    _, ref_err = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_err[-2000:]

    got = json.loads((tmp_path / "a" / "results.json").read_text())
    want = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [(r["seed"], r["method"]) for r in got["runs"]] == [(0, "persistent"), (0, "restarts")]
    assert got["config"]["pixels"] == "lossy JPEG" and got["config"]["val_images"] == 15
    for g, w in zip(got["runs"], want["runs"], strict=True):
        assert g["champion_iteration"] == w["champion_iteration"]
        assert len(g["history"]) == 2
        for hg, hw in zip(g["history"], w["history"], strict=True):
            assert set(hg) >= {"iteration", "val_acc", "test_acc", "loss", "layer", "seconds"}
            for k in ("iteration", "val_acc", "test_acc", "loss", "layer"):
                assert hg[k] == hw[k], (g["method"], k)
            assert hg["seconds"] > 0  # the killed run's timing survives the resumption
    assert got["runs"][0]["history"][1]["layer"] in (
        "Conv_0",
        "Conv_1",
        "Dense_0",
        "Dense_1",
        "Dense_2",
    )
    assert (tmp_path / "a" / "images.png").stat().st_size > 0
    assert "persistent" in out and "restarts" in out


def test_resnet_problem_threads_batch_stats_and_the_augmentation_step():
    proto = ex.get_protocol("paper", "resnet18", "partial")
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    sample = np.zeros((1, 32, 32, 3), np.uint8)
    prob = ex.make_problem("resnet18", proto, mean, std, sample)
    params, state = jax.eval_shape(prob.init, jax.random.key(0))
    assert prob.has_state and set(state) == {"batch_stats", "aug_step"}
    batch = {"x": jax.ShapeDtypeStruct((4, 32, 32, 3), np.uint8),
             "y": jax.ShapeDtypeStruct((4,), np.int32)}  # fmt: skip
    loss, new = jax.eval_shape(prob.loss_fn, params, state, batch)
    assert loss.shape == () and jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(
        state
    )
    assert new["aug_step"].dtype == np.int32 and new["aug_step"].shape == ()
    with pytest.raises(ValueError, match="only resnet18 augments"):
        ex.make_problem("lenet5", ex.get_protocol("cpu", "lenet5", "full", augment=True), mean,
                        std, sample)  # fmt: skip


def test_images_command_bad_arguments_get_one_line_and_exit_2(tmp_path, capsys):
    from pnjax.cli import main

    code = main(["images", "--dataset", "fashion_mnist", "--model", "alexnet",
                 "--out", str(tmp_path), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "with --dataset fashion_mnist use --model lenet5" in err
    with pytest.raises(SystemExit) as e:
        main(["images", "--methods", "dropout", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'dropout'" in capsys.readouterr().err


def _part(seeds, methods, **cfg):
    def run(seed, method):
        plain, champ = 0.5 + 0.01 * seed, 0.52 + 0.02 * seed + 0.01 * len(method) % 3
        hist = [{"iteration": 0, "val_acc": plain, "test_acc": plain},
                {"iteration": 1, "val_acc": champ, "test_acc": champ}]  # fmt: skip
        return {"seed": seed, "method": method, "champion_iteration": 1, "history": hist}

    runs = [run(s, m) for s in seeds for m in methods]
    config = {"model": "lenet5", "mode": "full", "protocol": "cpu", "init_std": 0.2,
              "seeds": list(seeds), "methods": list(methods), "jax": "0.10.2",
              "backend": "cpu", **cfg}  # fmt: skip
    return {"config": config, "runs": runs, "summary": ex.summarize(runs), "seconds": 1.0}


def test_merge_results_equals_one_run_of_all_seeds_and_refuses_mismatches():
    methods = ("persistent", "restarts")
    whole = _part([0, 1, 2], methods)
    merged = ex.merge_results([_part([2], methods), _part([0, 1], methods)])
    assert merged["summary"] == whole["summary"]
    assert [(r["seed"], r["method"]) for r in merged["runs"]] == [
        (r["seed"], r["method"]) for r in whole["runs"]
    ]
    assert merged["config"]["seeds"] == [0, 1, 2] and merged["seconds"] == 2.0
    assert merged["summary"]["persistent"]["gain"]["se"] is not None
    with pytest.raises(ValueError, match=r"config 'init_std': 0.05 against 0.2"):
        ex.merge_results([_part([0], methods), _part([1], methods, init_std=0.05)])
    with pytest.raises(ValueError, match=r"seed 1 method 'restarts' appears in results 0 and"):
        ex.merge_results([_part([1], methods), _part([1], ("restarts",))])
    with pytest.raises(ValueError, match="at least one"):
        ex.merge_results([])


def test_images_merge_command_writes_the_table_and_errors_in_one_line(tmp_path, capsys):
    from pnjax.cli import main

    for name, seeds in (("s0", [0]), ("s1", [1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps(_part(seeds, ("persistent",), dataset="cifar10", pixels="lossy JPEG"))
        )
    code = main(["images-merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                 "--out", str(tmp_path / "all")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "over seeds [0, 1]" in out
    got = json.loads((tmp_path / "all" / "results.json").read_text())
    assert got["config"]["seeds"] == [0, 1] and (tmp_path / "all" / "images.png").stat().st_size
    code = main(["images-merge", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "nope/results.json' does not exist" in err and err.count("\n") == 1
    (tmp_path / "s1" / "results.json").write_text("{")
    code = main(["images-merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                 "--out", str(tmp_path / "y")])  # fmt: skip
    assert code == 2 and "is not valid JSON" in capsys.readouterr().err
