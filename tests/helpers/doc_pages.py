"""The Markdown pages a user reads (README.md, docs/*.md, CONTRIBUTING.md) taken apart for the tests that keep
them true: their fenced code blocks, their inline code, their links, and the commands of their bash blocks."""

from __future__ import annotations

import glob
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
DOCS = ROOT / "docs"

# A fence may be indented (a block inside a list item); its body is dedented by the fence's indent.
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)
_INLINE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
_SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")  # $(command): run on its own, its output one word
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")
_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
_OPERATORS = {"&&", "||", ";", "|", "&"}
# A path in the repository, as pages name them: under one of its top folders, or one of its top files.
REPO_PATH = re.compile(r"^(?:configs|jobs|pipeline|tests|benchmarks|docs|deploy|\.ci)/\S*$")
TOP_FILES = {"cluster.yaml", "Makefile", "pyproject.toml", "mkdocs.yml", "CONTRIBUTING.md", "README.md"}
BARE_TEST = re.compile(r"^test_\w+\.py$")  # a test module named without its folder (its basename is unique)
PLACEHOLDER = set("<{|")


@dataclass(frozen=True)
class Block:
    """A fenced code block: the page, the line of its opening fence (1-based), its language and its text."""

    page: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def user_pages() -> list[Path]:
    """The README and every page of the docs site."""
    return [README, *sorted(DOCS.glob("*.md"))]


def code_blocks(page: Path, lang: str | None = None) -> list[Block]:
    """The fenced code blocks of `page` in order, those of language `lang` only when given."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in _FENCE.finditer(text):
        indent = m["indent"]
        body = "".join(line.removeprefix(indent) for line in m["body"].splitlines(keepends=True))
        blocks.append(Block(page, text.count("\n", 0, m.start()) + 1, m["lang"], body))
    return [b for b in blocks if lang is None or b.lang == lang]


def section_blocks(page: Path, heading: str, lang: str) -> list[Block]:
    """The code blocks of language `lang` under the heading `heading` of `page` (any level), up to the next
    heading of the same or a higher level."""
    lines = prose(page).splitlines()
    start = next(i for i, line in enumerate(lines, 1) if re.fullmatch(rf"#+ {re.escape(heading)}", line))
    level = len(lines[start - 1]) - len(lines[start - 1].lstrip("#"))
    after = [i for i, line in enumerate(lines, 1) if i > start and re.match(rf"#{{1,{level}}} ", line)]
    end = after[0] if after else len(lines) + 1
    return [b for b in code_blocks(page, lang) if start < b.line < end]


def prose(page: Path) -> str:
    """The page with its fenced blocks blanked out (lines kept, so line numbers stay true)."""
    text = page.read_text(encoding="utf-8")
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def inline_code(page: Path) -> list[tuple[int, str]]:
    """(line, text) of every `inline code` span outside the fenced blocks."""
    return [(n, span) for n, line in enumerate(prose(page).splitlines(), 1) for span in _INLINE.findall(line)]


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside the fenced blocks."""
    return [(n, target) for n, line in enumerate(prose(page).splitlines(), 1) for target in _LINK.findall(line)]


def shell_commands(page: Path) -> list[tuple[Block, list[str]]]:
    """The simple commands of a page's bash blocks, as (block, argument list): continuation lines joined,
    comments dropped, split at && || ; | &, each $(command) a command of its own, and $NAME expanded where
    the page assigns NAME earlier (NAME="..." on a line of its own, in any of its bash blocks).
    Assignments themselves are not commands."""
    variables: dict[str, str] = {}
    return [(block, words) for block in code_blocks(page, "bash") for words in _commands(block.text, variables)]


def _commands(text: str, variables: dict[str, str]) -> list[list[str]]:
    """The simple commands of one block's text; its assignments are added to `variables`."""
    commands: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = _VARIABLE.sub(lambda m: variables.get(m[1] or m[2], m[0]), line)
        inner = _SUBSTITUTION.findall(line)
        line = _SUBSTITUTION.sub("SUBSTITUTED", line)
        for text in [*inner, line]:
            for words in _split(text):
                if len(words) == 1 and _ASSIGNMENT.match(words[0]):
                    name, _, value = words[0].partition("=")
                    variables[name] = value
                    continue
                while words and _ASSIGNMENT.match(words[0]):  # FOO=bar cmd: an environment for one command
                    words = words[1:]
                if words:
                    commands.append(words)
    return commands


def _split(text: str) -> list[list[str]]:
    """Shell words of one line, cut into simple commands at the control operators."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in _OPERATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def repository_paths(page: Path) -> list[tuple[str, str]]:
    """(where, path) of every repository path in a page's inline code and bash blocks; placeholders such as
    jobs/<stage>_stage.py, {train,eval} or demo|tiny left out."""
    spans = [(n, word) for n, span in inline_code(page) for word in span.split()]
    spans += [(block.line, word) for block, words in shell_commands(page) for word in words]
    found = []
    for line, word in spans:
        word = word.strip(",;:()'\"")
        word = word if word.endswith("...") else word.rstrip(".")  # `test_x.py::test_long_name_...` stays
        named = REPO_PATH.match(word) or word in TOP_FILES or BARE_TEST.match(word.split("::")[0])
        if named and not PLACEHOLDER & set(word):
            found.append((f"{page.relative_to(ROOT)}:{line}", word))
    return found


def resolve(path: str) -> list[str]:
    """What a named path is in the repository: the files it names, [] if it names nothing there.
    `file::test_name` must name a test defined in the file; a bare test module is looked up under tests/."""
    path, _, test = path.partition("::")
    if BARE_TEST.match(path):
        matches = glob.glob(f"tests/**/{path}", root_dir=ROOT, recursive=True)
    else:
        matches = glob.glob(path, root_dir=ROOT)
    if test and "..." not in test:
        matches = [m for m in matches if re.search(rf"^\s*def {re.escape(test)}\(", (ROOT / m).read_text(), re.M)]
    return matches
