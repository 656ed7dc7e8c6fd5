"""The pnjax command: one-line errors (exit 2, no traceback), checkpoint/resume, argv fuzzing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
