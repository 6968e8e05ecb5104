"""The documentation keeps up with the code: every console-script flag is in the README and has help text,
the README stays short and names nothing outside the repository, and its links into benchmarks/RESULTS.md land.

The console scripts are read from pyproject.toml's [project.scripts]; each module must offer build_parser(),
so the flags checked here are the ones the command parses.
"""

import argparse
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
ARCHITECTURE = os.path.join(ROOT, "docs", "ARCHITECTURE.md")
MAX_README_LINES = 420
# Set by tp_runtime itself in each Ray actor (distributed/ray_cluster.py), never by a user.
INTERNAL_ENV = {"TP_RUNTIME_LAUNCHER", "TP_RUNTIME_RANK_CPUS"}


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def console_scripts() -> dict[str, str]:
    """{script name: module} from pyproject.toml's [project.scripts] (no TOML parser needed on Python 3.10)."""
    text = read(os.path.join(ROOT, "pyproject.toml"))
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", text, re.S | re.M).group(1)
    return {name: target.split(":")[0] for name, target in re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M)}


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of every console script, subcommands included: {"tp-eval perplexity": parser, ...}."""
    out = {}
    for name, module in sorted(console_scripts().items()):
        top = importlib.import_module(module).build_parser()
        out[name] = top
        for action in top._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, parser in action.choices.items():
                    out[f"{name} {sub}"] = parser
    return out


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def flags_missing_from(text: str, parser_map: dict) -> list[str]:
    missing = []
    for name, parser in parser_map.items():
        for action in options(parser):
            for flag in action.option_strings:
                if flag.startswith("--") and not re.search(re.escape(flag) + r"(?![\w-])", text):
                    missing.append(f"{name} {flag}")
    return missing


def test_the_six_console_scripts_build_their_parsers():
    assert set(console_scripts()) == {"tp-convert", "tp-run", "tp-plan", "tp-eval", "tp-serve", "tp-verify"}
    names = parsers()
    assert {"tp-eval perplexity", "tp-eval summarize"} <= set(names)


def test_every_long_flag_is_in_the_readme():
    assert flags_missing_from(read(README), parsers()) == []


def test_the_flag_check_can_fail():
    """A README without one flag (here: --woq_kernel) is caught, and a longer flag does not hide a shorter one."""
    text = read(README)
    stripped = re.sub(r"--woq_kernel(?![\w-])", "", text)
    missing = flags_missing_from(stripped, parsers())
    assert "tp-run --woq_kernel" in missing and "tp-serve --woq_kernel" in missing
    assert flags_missing_from("--engine_dir", {"x": _toy_parser()}) == ["x --engine"]


def _toy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--engine")
    p.add_argument("--engine_dir")
    return p


def test_every_option_has_help_choices_and_defaults_shown():
    for name, parser in parsers().items():
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None:  # each subcommand is described in the parent's --help
            assert all(c.help and c.help.strip() for c in sub._choices_actions), name
        for action in options(parser):
            flag = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{name} {flag} has no help text"
            if action.choices is not None:  # argparse lists them as {a,b,c} unless a metavar hides them
                assert action.metavar is None, f"{name} {flag}: a metavar hides the choices"
            if action.default not in (None, False, [], argparse.SUPPRESS) and not action.required:
                assert "%(default)" in action.help, f"{name} {flag}: --help does not show the default"
        parser.format_help()  # every help string formats (a stray % would raise here)


def test_woq_kernel_help_names_every_kernel():
    from tp_runtime.runtime.woq import KERNELS

    help_text = parsers()["tp-run"].format_help()
    flat = " ".join(help_text.split())
    for name in KERNELS:
        assert re.search(rf"\b{name}\b", flat), name


def test_readme_is_short_and_self_contained():
    text = read(README)
    assert len(text.splitlines()) < MAX_README_LINES


@pytest.mark.parametrize("path", [README, RESULTS, ARCHITECTURE], ids=os.path.basename)
def test_docs_name_nothing_outside_the_repository(path):
    text = read(path)
    assert not re.search(r"\bsession\b", text, re.I), "a doc speaks of sessions"
    assert not re.search(r"(?<![\w.])/work", text), "a doc names a path under /work"
    assert "../" not in text, "a doc names a path outside the repository"


def test_readme_documents_every_environment_variable():
    found = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "tp_runtime")):
        for f in files:
            if f.endswith(".py"):
                found |= set(re.findall(r"TP_RUNTIME_[A-Z_]+[A-Z]", read(os.path.join(dirpath, f))))
    text = read(README)
    assert found - INTERNAL_ENV, "no environment variable found: the scan is broken"
    assert sorted(v for v in found - INTERNAL_ENV if v not in text) == []


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation but - and _ dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_into_results_land():
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", read(RESULTS), re.M)}
    links = re.findall(r"benchmarks/RESULTS\.md#([\w\-]+)", read(README))
    assert links, "the README quotes no measured figure"
    assert sorted(set(links) - anchors) == []
