"""The command line: one entry point, subcommands, bad input as one line and exit status 2."""

import logging
import subprocess
import sys

import pytest

from mofast.cli import SUBCOMMANDS, main


def test_every_subcommand_has_help():
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--micro-batch", "0"], "micro_batch must be at least 1"),
        (["train", "--config", "no-such-config.yaml"], "no config file 'no-such-config.yaml'"),
        # A wrong --resume folder ended with exit status 1 and no "mofast train: error:".
        (["train", "--resume", "/no/such/run"], "/no/such/run is not a mofast run folder"),
        # transformers reported a missing folder as a malformed hub id, in a 79-line traceback.
        (["train", "--model", "/no/such/model", "--max-steps", "1"], "no model folder at"),
        # The shipped UltraFeedback config sets `dataset`: switching its mode must say how to
        # clear the field the new mode refuses.
        (
            ["train", "--config", "qwen2.5-0.5b-ultrafeedback", "--data-mode", "pairs"],
            "(--dataset null clears one that a config file sets)",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ctrl_c_is_one_line_and_exit_status_130(monkeypatch, capsys):
    import mofast.toy

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mofast.toy, "run", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["toy"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "mofast toy: interrupted\n"


def test_an_os_error_naming_no_file_says_how_to_find_it(monkeypatch, capsys):
    # A full disk while writing the metrics reads "[Errno 28] No space left on device":
    # one line, but it must say how to learn which write failed.
    import errno
    import os

    import mofast.toy

    def disk_full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mofast.toy, "run", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        main(["toy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--log-level DEBUG" in err
    assert err.count("\n") == 1


def test_train_says_only_what_it_wrote(tmp_path, caplog):
    # With plots and the final model switched off, the last line claimed both were written.
    caplog.set_level(logging.INFO, logger="mofast.train")
    run = tmp_path / "run"
    argv = ["train", "--output-dir", str(run), "--cache-dir", str(tmp_path / "cache")]
    argv += ["--max-steps", "1", "--max-pairs", "4", "--max-length", "32", "--micro-batch", "2"]
    argv += ["--grad-accum", "1", "--threads", "1", "--tensorboard", "false"]
    assert main([*argv, "--plots", "false", "--save-model", "false"]) == 0
    assert caplog.records[-1].getMessage() == f"done: metrics in {run}"
    assert not (run / "model").exists()


def test_python_dash_m_mofast_reaches_the_same_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "mofast", "toy", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "toy problem" in out.stdout
