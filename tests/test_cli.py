"""The command line's general behaviour: ``--version``, help text for every option, and resource
faults (an unwritable or full output folder, a missing file) as one line on stderr with exit code 2."""
from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
from importlib import metadata

import pytest

import clipscope
from clipscope.cli import build_parser, main


def _subparsers_action(parser: argparse.ArgumentParser) -> argparse.Action:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # argparse has no public view
    return sub


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return dict(_subparsers_action(build_parser()).choices)


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """The options and positionals of ``parser`` (besides -h) whose help text is empty or missing."""
    return [a.dest for a in parser._actions
            if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())
            and a.help != argparse.SUPPRESS]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"clipscope {clipscope.__version__}\n"
    assert clipscope.__version__ == metadata.version("clipscope-toolkit")  # one source of truth


def test_the_top_level_parser_documents_every_option_and_command():
    parser = build_parser()
    assert _undocumented(parser) == []
    commands = _subparsers_action(parser)._choices_actions
    assert sorted(c.dest for c in commands) == sorted(_subcommands())
    assert [c.dest for c in commands if not (c.help and c.help.strip())] == []


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_of_every_command_has_help(command):
    assert _undocumented(_subcommands()[command]) == [], f"`clipscope {command}`: options without help text"


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_of_every_command_shows_each_option_with_its_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for action in _subcommands()[command]._actions:
        for flag in action.option_strings:
            assert flag in shown, flag
        assert "".join(action.help.split()) in shown, action.dest


def _fault_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("argv", [["demo", "--steps", "1"],
                                  ["visualize", "--site", "visual.layer4", "--model", "clipscope-tiny-rn"]],
                         ids=["demo", "visualize"])
def test_an_output_folder_under_a_regular_file_is_one_error_line_naming_it(argv, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "report"
    assert main(argv + ["--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"clipscope: error: {out}: {os.strerror(errno.ENOTDIR)}"]
    assert captured.out == ""  # it failed before loading a model


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_or_read_only_output_folder_is_one_error_line_with_path_and_cause(code, tmp_path, monkeypatch, capsys):
    target = tmp_path / "report" / "index.html"

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr("clipscope.demo.run_demo", fail)
    assert main(["demo", "--out", str(tmp_path / "report")]) == 2
    assert _fault_lines(capsys) == [f"clipscope: error: {target}: {os.strerror(code)}"]


def test_an_error_naming_two_paths_names_both(tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a/tmp-file", None, "/b/index.html")  # as os.replace

    monkeypatch.setattr("clipscope.demo.run_demo", fail)
    assert main(["demo"]) == 2
    assert _fault_lines(capsys) == [f"clipscope: error: /a/tmp-file -> /b/index.html: {os.strerror(errno.EXDEV)}"]


def test_an_os_error_without_a_path_keeps_its_message(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise FileNotFoundError("the organism's weights are missing")

    monkeypatch.setattr("clipscope.demo.run_demo", fail)
    assert main(["demo"]) == 2
    assert _fault_lines(capsys) == ["clipscope: error: the organism's weights are missing"]


def test_demo_refuses_a_step_count_below_one_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--steps", "0", "--out", str(out)]) == 2
    (line,) = _fault_lines(capsys)
    assert line.startswith("clipscope: error: steps=0 is not valid") and ">= 1" in line
    assert not out.exists()


@pytest.mark.slow
def test_python_m_clipscope_exits_2_without_a_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = subprocess.run([sys.executable, "-m", "clipscope", "demo", "--out", str(blocker / "report")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"clipscope: error: {blocker / 'report'}: {os.strerror(errno.ENOTDIR)}"]
    assert run.stdout == ""
