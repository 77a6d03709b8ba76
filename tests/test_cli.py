"""``fvq`` and ``python -m fvq`` are one command."""

import shutil
import subprocess
import sys

import pytest

from fvq.cli import COMMANDS, main


def _run(args):
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_python_m_fvq_equals_console_script():
    module = _run([sys.executable, "-m", "fvq", "--help"])
    assert module.returncode == 0
    for name in COMMANDS:
        assert name in module.stdout
    script = shutil.which("fvq", path=str(__import__("pathlib").Path(sys.executable).parent))
    if script is None:
        pytest.skip("the fvq console script is not installed next to this interpreter")
    console = _run([script, "--help"])
    assert console.returncode == 0 and console.stdout == module.stdout
    assert _run([script, "--version"]).stdout == _run([sys.executable, "-m", "fvq", "--version"]).stdout


def test_every_command_builds_its_parser():
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0


def test_unknown_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag"])
    assert "unrecognized arguments" in capsys.readouterr().err
