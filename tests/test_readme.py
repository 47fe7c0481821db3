"""The README (and BENCHMARKS.md) tell the truth about commands: every shell command they show
parses with the real parser (``ray-app``, ``python -m ray_app...`` modules, benchmark scripts, the
``ray`` and ``serve`` CLIs), every ``make`` target exists and its recipe parses too, every path in
the repository they name exists, every ``ray_app.x.y`` name they cite imports, a sample file the
demo is said to write is one it writes, and no endpoint is queried before a command that starts it.

Nothing here starts Ray or runs a stage: parsers are stopped right after parsing, so it is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import os
import re
import runpy
import shlex
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "BENCHMARKS.md")
# Outputs that commands create (git ignores them): named in the docs, absent from a fresh clone.
OUTPUT_DIRS = ("workspace/", "benchmarks/results/", "test-artifacts/")
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
WORKLOADS = ("image", "text", "ctr")


@dataclass
class Command:
    doc: str
    where: str  # "block 3" / "inline" — for messages
    argv: list[str]

    def __str__(self) -> str:
        return f"{self.doc} ({self.where}): {shlex.join(self.argv)}"


# ---- reading the docs --------------------------------------------------------------------------
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
COMMAND_WORDS = ("ray-app", "python", "python3", "make", "ray", "serve", "curl", ".venv/bin/")


def _expand(line: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), line)


def _commands_in_line(line: str, env: dict[str, str]) -> Iterator[list[str]]:
    line = re.sub(r"\$\([^()]*\)", "COMMAND-OUTPUT", line)  # $(...) is a value, not a command of the docs
    lexer = shlex.shlex(_expand(line, env), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    current: list[str] = []
    tokens = iter(lexer)
    for token in tokens:
        if token in SEPARATORS:
            yield current
            current = []
        elif token in REDIRECTS:
            next(tokens, None)  # the redirect's target is not an argument
        elif token in ("...", "…"):
            continue  # "and so on" in an example list
        else:
            # "[--use-gpu]": an optional flag in the usual notation
            current.append(token[1:-1] if token.startswith("[") and token.endswith("]") else token)
    yield current


def shell_commands(doc: str, text: str) -> Iterator[tuple[int, Command]]:
    """(offset in the doc, command) for every command of every ``bash``/``sh`` block and every
    inline code span that starts with a command word."""
    env = {"PWD": str(ROOT), "HOME": str(Path.home())}
    for number, block in enumerate(FENCE.finditer(text), 1):
        if block.group(1) not in ("bash", "sh", "shell", "console"):
            continue
        for line in block.group(2).replace("\\\n", " ").splitlines():
            for argv in _commands_in_line(line, env):
                while argv and re.fullmatch(r"\w+=.*", argv[0], re.S):  # VAR=value prefixes / assignments
                    name, _, value = argv.pop(0).partition("=")
                    if not argv:
                        env[name] = value
                if argv[:1] == ["export"]:
                    for assignment in argv[1:]:
                        name, _, value = assignment.partition("=")
                        env[name] = value
                    continue
                if argv:
                    yield block.start(), Command(doc, f"block {number}", argv)
    prose = FENCE.sub(lambda m: " " * len(m.group(0)), text)  # keep offsets
    for span in re.finditer(r"`([^`]+)`", prose):
        code = " ".join(span.group(1).split())
        words = code.split(" ")
        if "<" in code or code.endswith(("…", "...")) or not words[0].startswith(COMMAND_WORDS) or len(words) < 2:
            continue  # a placeholder ("ray-app <workload> serve"), elided ("ray job …") or not a command
        if words[0] in ("ray", "serve") and len(words) < 3:
            continue  # a command's name in prose ("`serve deploy`s the app"), not a command line
        for argv in _commands_in_line(code, env):
            while argv and re.fullmatch(r"\w+=.*", argv[0], re.S):
                argv.pop(0)
            if argv:
                yield span.start(), Command(doc, "inline", argv)


def inline_names(text: str) -> list[str]:
    prose = FENCE.sub("", text)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def docs() -> dict[str, str]:
    return {name: (ROOT / name).read_text() for name in DOCS if (ROOT / name).exists()}


def all_commands() -> list[Command]:
    found = []
    for doc, text in docs().items():
        found += [command for _, command in sorted(shell_commands(doc, text), key=lambda pair: pair[0])]
    return found


# ---- checking one command with the real parsers -------------------------------------------------
class _Parsed(Exception):
    """Raised right after a parser accepted the arguments: nothing runs past parsing."""


@contextlib.contextmanager
def _stop_after_parsing() -> Iterator[io.StringIO]:
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # a bad flag: SystemExit(2), argparse's message on stderr
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            yield errors
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv[:], sys.path[:] = saved_argv, saved_path


def _run_parser(run, argv0: str, args: list[str]) -> str | None:
    """None when the program's own argparse parser accepts ``args``, else the reason."""
    with _stop_after_parsing() as errors, warnings.catch_warnings():
        # runpy warns when the module was imported before (by this suite): harmless here.
        warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
        sys.argv = [argv0, *args]
        try:
            run()
        except _Parsed:
            return None
        except SystemExit as exc:
            return None if exc.code == 0 else f"rejected: {errors.getvalue().strip() or exc.code}"
    return "ran without parsing its arguments with argparse"


def check_ray_app(args: list[str]) -> list[str]:
    from ray_app.cli import build_parser

    problem = _run_parser(lambda: build_parser().parse_args(sys.argv[1:]), "ray-app", args)
    return [problem] if problem else []


def check_python(args: list[str]) -> list[str]:
    """``python -m ray_app...`` or ``python <repo script>``; other interpreters' uses are skipped."""
    if args[:1] == ["-m"] and len(args) > 1:
        module, rest = args[1], args[2:]
        if module == "ray_app":
            return check_ray_app(rest)
        if not module.startswith("ray_app."):
            return []
        if importlib.util.find_spec(module) is None:
            return [f"no module {module}"]
        problems = [p for p in [_run_parser(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), module, rest)] if p]
        if module == "ray_app.watcher" and "--" in rest:  # flags after -- go to `ray-app <workload> predict`
            workload = rest[rest.index("--workload") + 1] if "--workload" in rest else "image"
            problems += check_ray_app([workload, "predict", *rest[rest.index("--") + 1 :]])
        return problems
    if args and args[0].endswith(".py"):
        script = ROOT / args[0]
        if not script.is_file():
            return [f"no script {args[0]}"]
        problem = _run_parser(lambda: runpy.run_path(str(script), run_name="__main__"), str(script), args[1:])
        return [problem] if problem else []
    return []


def _click_context(cli: click.Command, name: str, args: list[str]) -> click.Context:
    """Resolve subcommands by name (the docs never pass group options), then let click parse and
    validate the leaf command's options without invoking it."""
    parent = None
    while isinstance(cli, click.Group):
        group_context = click.Context(cli, info_name=name, parent=parent)
        sub = cli.get_command(group_context, args[0]) if args else None
        if sub is None:
            raise click.UsageError(f"no command {name} {args[:1]}")
        parent, cli, name, args = group_context, sub, args[0], args[1:]
    return cli.make_context(name, list(args), parent=parent)


def check_click(program: str, args: list[str]) -> list[str]:
    if program == "ray":
        from ray.scripts.scripts import cli
    else:
        from ray.serve.scripts import cli
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            context = _click_context(cli, program, args)
    except click.exceptions.Exit:  # --help
        return []
    except click.ClickException as exc:
        return [f"rejected: {exc.format_message()}"]
    entrypoint = context.params.get("entrypoint")
    return check_argv(list(entrypoint)) if entrypoint else []  # `ray job submit ... -- python -m ...`


def makefile() -> tuple[dict[str, list[str]], dict[str, str]]:
    """Targets with their recipe lines, and the Makefile's simple variables."""
    targets: dict[str, list[str]] = {}
    variables: dict[str, str] = {}
    current: list[str] | None = None
    for line in (ROOT / "Makefile").read_text().replace("\\\n", " ").splitlines():
        if line.startswith("\t") and current is not None:
            current.append(line.strip())
            continue
        assignment = re.match(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", line)
        rule = re.match(r"^([\w.-]+)\s*:(?!=)", line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
        elif rule:
            current = targets.setdefault(rule.group(1), [])
        elif line.strip() and not line.startswith("#"):
            current = None
    return targets, variables


def check_make(args: list[str]) -> list[str]:
    targets, variables = makefile()
    problems = []
    for target in (a for a in args if not a.startswith("-") and "=" not in a):
        if target not in targets:
            problems.append(f"no make target {target!r}")
            continue
        for recipe in targets[target]:
            line = recipe.lstrip("@-")
            for _ in range(5):
                line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
            if line.startswith("#") or "$(" in line:
                continue
            for argv in _commands_in_line(line, {}):
                if argv and os.path.basename(argv[0]).startswith("python"):
                    problems += [f"`make {target}` runs `{shlex.join(argv)}`: {p}" for p in check_python(argv[1:])]
    return problems


def check_argv(argv: list[str]) -> list[str]:
    program = argv[0].removeprefix(".venv/bin/")
    args = argv[1:]
    if "$" in program:
        return [f"{program}: a variable the docs never set"]
    if program == "ray-app":
        return check_ray_app(args)
    if os.path.basename(program) in ("python", "python3"):
        return check_python(args)
    if program == "make":
        return check_make(args)
    if program in ("ray", "serve"):
        return check_click(program, args)
    return []


# ---- paths and names ----------------------------------------------------------------------------
def _braces(token: str) -> list[str]:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    if not match:
        return [token]
    return list(
        itertools.chain.from_iterable(_braces(token[: match.start()] + part + token[match.end() :]) for part in match.group(1).split(","))
    )


def repo_path(token: str) -> str | None:
    """The repository-relative path a token names, or None when it names something else (a user's
    file, a URL, a cloud bucket). Only paths under a top-level entry of the repository count."""
    token = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
    token = token.split("@", 1)[1] if "@" in token and "://" not in token else token
    if "://" in token or not token or token.startswith("-"):
        return None
    if token.startswith(str(ROOT) + "/"):
        token = token[len(str(ROOT)) + 1 :]
    token = token.removeprefix("./")
    top = token.split("/")[0]
    if not top or top in (".", "..") or ("/" not in token and top not in ("Makefile", "README.md", "BENCHMARKS.md", "pyproject.toml")):
        return None
    if top not in {entry.name for entry in ROOT.iterdir()} and top not in ("workspace", ".venv"):
        return None
    return token


def demo_writes(path: str) -> bool:
    """``workspace/demo_images/<digit>/<index>_<repeat>.png`` is a file `make demo` writes when
    that index of the shipped MNIST set is that digit (file names are not in label order)."""
    from ray_app.demos.data import load_mnist_5k

    match = re.fullmatch(r"workspace/demo_images/(\d)/(\d{5})_0\.png", path)
    if not match:
        return False
    _, labels = load_mnist_5k()
    index = int(match.group(2))
    return index < len(labels) and int(labels[index]) == int(match.group(1))


def named_paths() -> list[tuple[str, str]]:
    found = []
    for doc, text in docs().items():
        tokens = [t for command in all_commands() if command.doc == doc for t in command.argv]
        tokens += [name for name in inline_names(text) if " " not in name]
        for token in tokens:
            for expanded in _braces(token):
                path = repo_path(expanded)
                if path:
                    found.append((doc, path))
    return sorted(set(found))


# ---- the tests ----------------------------------------------------------------------------------
def test_the_docs_show_commands_at_all():
    commands = all_commands()
    programs = {c.argv[0].removeprefix(".venv/bin/") for c in commands}
    assert {"ray-app", "make", "ray", "curl"} <= programs, programs
    assert len(commands) > 30


def test_every_command_parses_with_the_real_parser():
    problems = [f"{command}\n    {problem}" for command in all_commands() for problem in check_argv(command.argv)]
    assert not problems, "\n".join(problems)


def test_every_path_named_exists():
    missing = []
    for doc, path in named_paths():
        if path.startswith("workspace/demo_images/"):
            if not demo_writes(path):
                missing.append(f"{doc}: {path} (not a file `make demo` writes)")
        elif not path.startswith(OUTPUT_DIRS) and not (ROOT / path).exists():
            missing.append(f"{doc}: {path}")
    assert not missing, "\n".join(missing)


def test_every_ray_app_name_cited_imports():
    missing = []
    for doc, text in docs().items():
        for name in {n for n in inline_names(text) if re.fullmatch(r"ray_app(\.\w+)+", n)}:
            parts = name.split(".")
            for split in range(len(parts), 0, -1):
                module_name = ".".join(parts[:split])
                try:
                    spec = importlib.util.find_spec(module_name)
                except ModuleNotFoundError:  # a name inside a module, not a submodule
                    spec = None
                if spec is not None:
                    target = importlib.import_module(module_name)
                    for attribute in parts[split:]:
                        target = getattr(target, attribute, None)
                    if target is None:
                        missing.append(f"{doc}: {name}")
                    break
            else:
                missing.append(f"{doc}: {name}")
    assert not missing, missing


def test_no_endpoint_is_queried_before_it_is_started():
    """A ``curl`` to ``/<workload>/predict`` comes after a command that serves that workload."""
    premature = []
    for doc in docs():
        serving: set[str] = set()
        for command in (c for c in all_commands() if c.doc == doc):
            argv = [a.removeprefix(".venv/bin/") for a in command.argv]
            if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "ray_app"]:
                argv = ["ray-app", *argv[3:]]
            if argv[0] == "ray-app" and len(argv) > 2 and argv[2] == "serve":
                serving.add(argv[1])
            elif argv[0] == "serve" and argv[1:2] in (["run"], ["deploy"]) and len(argv) > 2:
                name = Path(argv[2]).stem
                serving |= set(WORKLOADS) if name not in WORKLOADS else {name}
            elif argv[0] == "curl":
                for workload in re.findall(r"/(image|text|ctr)/predict", " ".join(argv)):
                    if workload not in serving:
                        premature.append(str(command))
    assert not premature, "queried before anything serves it:\n" + "\n".join(premature)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (["ray-app", "image", "train", "--epochz", "3"], "rejected"),
        (["python", "-m", "ray_app.demos", "--workload", "audio"], "rejected"),
        (["ray", "start", "--hed"], "rejected"),
        (["make", "no-such-target"], "no make target"),
    ],
)
def test_the_checks_catch_a_wrong_command(bad, reason):
    """The checker itself: a typo in a flag, a wrong choice, an unknown target are reported."""
    problems = check_argv(bad)
    assert problems and reason in problems[0], problems
