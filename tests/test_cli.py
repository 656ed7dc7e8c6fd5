"""The pnjax command: one-line errors (exit 2, no traceback), checkpoint/resume, argv fuzzing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnjax import cli

ROOT = Path(__file__).resolve().parents[1]


def _main(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "required: COMMAND"),
        (["train"], "invalid choice: 'train'"),
        (["toy2d", "--lam", "-1"], "--lam must be finite and >= 0, got '-1'"),
        (["toy2d", "--lam", "nan"], "--lam must be finite and >= 0, got 'nan'"),
        (["toy2d", "--lam", "1e400"], "--lam must be finite and >= 0"),
        (["toy2d", "--lam", "abc"], "--lam must be a number, got 'abc'"),
        (["toy2d", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["toy2d", "--steps", "2.5"], "--steps must be an integer, got '2.5'"),
        (["toy2d", "--iterations", "-3"], "--iterations must be >= 0"),
        (["kink", "--iterations", "10000000"], "--iterations must be <= 100000"),
        (["toy2d", "--lr", "0"], "--lr must be > 0"),
        (["kink", "--reinit", "3", "--stuck-seeds", "5"], "--stuck-seeds 5 is more than"),
        (["toy2d", "--bogus"], "unrecognized arguments: --bogus"),
        (["kink", "--steps"], "expected one argument"),
    ],
)
def test_bad_arguments_one_line_exit_2(argv, needle, capsys, tmp_path):
    if argv and argv[0] in ("toy2d", "kink"):
        argv = [*argv, "--out", str(tmp_path)]
    code, out, err = _main(argv, capsys)
    assert code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_output_folder_errors(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = _main(["toy2d", "--out", str(f / "sub")], capsys)
    assert code == 2 and "cannot create output folder" in err and "writable --out" in err
    code, _, err = _main(["toy2d", "--out", str(tmp_path), "--checkpoint-dir", str(f)], capsys)
    assert code == 2 and "is a file, not a folder" in err
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            code, _, err = _main(["toy2d", "--out", str(ro)], capsys)
            assert code == 2 and "not writable" in err
        finally:
            ro.chmod(0o700)


def test_subprocess_python_m_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for argv, needle in [
        (["nonsense"], "invalid choice"),
        (["toy2d", "--lam", "-0.5", "--out", str(tmp_path)], "--lam must be finite and >= 0"),
    ]:
        p = subprocess.run(
            [sys.executable, "-m", "pnjax.cli", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2 and needle in p.stderr
        assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_toy2d_checkpoint_then_resume(capsys, tmp_path):
    out, ck = tmp_path / "out", tmp_path / "ck"
    base = ["toy2d", "--steps", "300", "--iterations", "2", "--quiet", "--out", str(out)]
    code, _, _ = _main([*base, "--checkpoint-dir", str(ck)], capsys)
    assert code == 0
    first = json.loads((out / "results.json").read_text())
    assert (ck / "toy2d" / "fit-000").is_dir()
    # the same folder again without --resume: refused, nothing overwritten
    code, _, err = _main([*base, "--checkpoint-dir", str(ck)], capsys)
    assert code == 2 and "pass --resume to continue it" in err and err.count("\n") == 1
    code, _, _ = _main([*base, "--checkpoint-dir", str(ck), "--resume"], capsys)
    assert code == 0
    assert json.loads((out / "results.json").read_text()) == first
    # resuming with other settings: a one-line error naming the difference
    code, _, err = _main(
        [*base[:2], "301", *base[3:], "--checkpoint-dir", str(ck), "--resume"], capsys
    )
    assert code == 2 and "steps: 300 in the checkpoint, 301 now" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # --resume without --checkpoint-dir uses OUT/checkpoints and starts afresh when empty
    code, _, err = _main([*base, "--resume"], capsys)
    assert code == 0 and "starting afresh" in err and (out / "checkpoints" / "toy2d").is_dir()


TOKENS = st.sampled_from(
    [
        "demo", "toy2d", "kink", "train", "--lam", "--steps", "--iterations", "--reinit",
        "--stuck-seeds", "--lr", "--out", "--quiet", "--resume", "--checkpoint-dir",
        "--no-controls", "--help", "-h", "0", "1", "-1", "2.5", "nan", "inf", "-inf", "1e999",
        "", " ", "abc", "\x00", "999999999999", "--", "-", "--lam=0.1", "--steps=3",
    ]
)  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(argv=st.lists(st.one_of(TOKENS, st.text(max_size=6)), max_size=7))
def test_fuzz_argv_never_traceback(argv, tmp_path_factory, monkeypatch, capsys):
    """Random argv: exit 0 or 2 and no traceback; training is replaced by a stub."""
    tmp = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(cli, "cmd_toy2d", lambda *a, **k: {})
    monkeypatch.setattr(cli, "cmd_kink", lambda *a, **k: {})
    code, _, err = _main(argv, capsys)
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("pnjax") and err.rstrip("\n").count("\n") == 0, err


# ----------------------------------------------------------------------------- reliability


def test_resume_refuses_any_other_setting(capsys, tmp_path):
    """Every setting is recorded: a resumed run with another --lr used to report the new lr
    for runs trained at the old one."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    base = ["toy2d", "--steps", "50", "--iterations", "1", "--quiet", "--out", str(out)]
    code, _, _ = _main([*base, "--checkpoint-dir", str(ck)], capsys)
    assert code == 0 and (ck / "toy2d" / cli.SETTINGS_FILE).is_file()
    first = (out / "results.json").read_text()
    for extra, needle in [
        (["--lr", "0.5"], "--lr: 0.001 in the checkpoint, 0.5 now"),
        (["--lam", "0.2"], "--lam: 0.1 in the checkpoint, 0.2 now"),
        (["--iterations", "2"], "--iterations: 1 in the checkpoint, 2 now"),
    ]:
        code, _, err = _main([*base, *extra, "--checkpoint-dir", str(ck), "--resume"], capsys)
        assert code == 2 and needle in err and err.count("\n") == 1, err
    assert (out / "results.json").read_text() == first
    # a damaged record is refused too
    rec = ck / "toy2d" / cli.SETTINGS_FILE
    rec.write_text(rec.read_text().replace("0.001", "0.002"))
    code, _, err = _main([*base, "--checkpoint-dir", str(ck), "--resume"], capsys)
    assert code == 2 and "is damaged" in err


def test_a_second_process_on_one_checkpoint_folder_is_refused(capsys, tmp_path):
    argv = ["toy2d", "--steps", "50", "--iterations", "0", "--quiet", "--out",
            str(tmp_path / "o"), "--checkpoint-dir", str(tmp_path / "ck"), "--resume"]  # fmt: skip
    assert _main(argv, capsys)[0] == 0
    (tmp_path / "o" / "results.json").unlink()
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pnjax import checkpoint as c; "
         "l = c.lock_folder(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
         str(tmp_path / "ck" / "toy2d")],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _main(argv, capsys)  # the same command again, while the first "runs"
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"in use by another pnjax process (pid {holder.pid}" in err
    assert err.count("\n") == 1 and not (tmp_path / "o" / "results.json").exists()


def test_rejected_command_line_creates_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, needle in [
        (["toy2d", "--out", "new1", "--lam", "-1"], "--lam must be finite"),
        (["kink", "--out", "new2", "--reinit", "3", "--stuck-seeds", "5"], "--stuck-seeds 5"),
        (["toy2d", "--out", "new3", "--checkpoint-dir", "ck3", "--bogus"], "unrecognized"),
        (["toy2d", "--out", ""], "--out must name a folder, got ''"),
        (["toy2d", "--out", "  "], "--out must name a folder"),
        (["kink", "--out", "new4", "--checkpoint-dir", ""], "must be a folder path"),
    ]:
        code, _, err = _main(argv, capsys)
        assert code == 2 and needle in err and err.count("\n") == 1, (argv, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, available, needle",
    [
        (["toy2d", "--steps", "1000000000"], 8e9, "(--steps 1000000000)"),  # the report's machine
        (["kink", "--steps", "1000000000"], 8e9, "(--steps 1000000000)"),
        (["kink", "--reinit", "100000"], 1e9, "(--reinit 100000)"),
    ],
)
def test_memory_is_estimated_before_starting(argv, available, needle, capsys, tmp_path,
                                             monkeypatch):  # fmt: skip
    monkeypatch.setattr(cli, "available_memory", lambda: available)
    monkeypatch.setattr(cli, "cmd_toy2d", lambda *a, **k: pytest.fail("must not start"))
    monkeypatch.setattr(cli, "cmd_kink", lambda *a, **k: pytest.fail("must not start"))
    out = tmp_path / "out"
    code, _, err = _main([*argv, "--out", str(out), "--checkpoint-dir", str(tmp_path / "c")],
                         capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "this run needs about" in err and needle in err and "GB" in err
    assert not out.exists() and not (tmp_path / "c").exists()


def test_memory_estimate_grows_with_steps_and_seeds(tmp_path):
    def need(*argv):
        return cli.estimate_memory(cli.build_parser().parse_args([*argv, "--out", str(tmp_path)]))[
            0
        ]

    assert need("kink") < 2e9, "the paper's protocol must fit a small machine"
    assert need("kink", "--steps", "1000000") > need("kink") + 1e8
    assert need("kink", "--reinit", "100000") > need("kink") + 5e8
    assert need("toy2d", "--steps", "100000000") > need("toy2d") + 1e9


def test_kink_reinit_compiles_once_for_all_chunks():
    """A new jax.jit per chunk of 25 seeds compiled --reinit / 25 times and kept each program."""
    from pnjax.experiments.kink import run_kink

    jits = []

    def counting_jit(fn):
        jits.append(fn)
        return jax.jit(fn)

    summary, _ = run_kink(num_reinit=6, reinit_chunk=2, num_stuck=0, iterations=0, steps=5,
                          controls=False, jit=counting_jit)  # fmt: skip
    assert len(jits) == 1 and len(summary["reinit"]["losses"]) == 6


def test_all_diverged_kink_is_strict_json_and_exits_1(capsys, tmp_path):
    out = tmp_path / "out"
    argv = ["kink", "--lr", "1e30", "--reinit", "2", "--stuck-seeds", "1", "--iterations", "1",
            "--steps", "20", "--no-controls", "--quiet", "--out", str(out)]  # fmt: skip
    code, stdout, err = _main(argv, capsys)
    assert code == 1 and "every one of the 2 re-initialized runs diverged" in err

    def no_nan(text):
        raise AssertionError(f"bare {text} in results.json")

    res = json.loads((out / "results.json").read_text(), parse_constant=no_nan)["kink"]
    r = res["reinit"]
    assert r["stuck_fraction"] is None and r["diverged"] == 2 and r["best_loss"] is None
    assert r["losses"] == [None, None] and r["stuck"] == [None, None]
    assert res["persistent"] == [] and "diverged" in stdout


def test_ctrl_c_stops_a_long_run_with_the_resume_hint(tmp_path):
    """A compiled run of 1e9 steps does not return to Python for minutes (5e7 steps, used here
    before, could end within the 4 s wait on a quiet machine): pnjax 0.1.0 took
    about 11 s to stop after Ctrl-C here (minutes with --steps 1e9); the main thread now waits
    for the run in a worker thread and stops at once."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    argv = ["toy2d", "--steps", "1000000000", "--out", str(tmp_path / "o"),
            "--checkpoint-dir", str(tmp_path / "c")]  # fmt: skip
    p = subprocess.Popen([sys.executable, "-m", "pnjax.cli", *argv], env=env,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for line in p.stderr:
            if "toy2d: plain" in line:  # training (one compiled program of 5e7 steps) starts
                break
        time.sleep(4.0)
        sent = time.perf_counter()
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=120)
        waited = time.perf_counter() - sent
        err = p.stderr.read()
    finally:
        p.kill()
        p.wait()
    assert code == 130 and "interrupted" in err and "--resume" in err, err
    assert "Traceback" not in err
    assert waited < 3, f"Ctrl-C took {waited:.1f}s to stop the run"
