"""The README and the docs pages stay true: their code runs, their configs load, their commands parse, and
every repository path, `make` target and link they name exists."""

import json
import re

import pytest
import torch

from tests.helpers.doc_pages import (
    README,
    ROOT,
    code_blocks,
    inline_code,
    links,
    repository_paths,
    resolve,
    shell_commands,
    user_pages,
)

LOSS_EXAMPLE = "register(LossSpec("  # the custom-loss block, wherever it lives


def blocks(lang: str):
    return [b for page in user_pages() for b in code_blocks(page, lang)]


def test_custom_loss_example_registers_and_trains():
    from pipeline.training.losses import LOSSES, PairLogps, compute_loss

    (block,) = [b for b in blocks("python") if LOSS_EXAMPLE in b.text]
    exec(compile(block.text, block.where, "exec"), {})
    try:
        batch = PairLogps(
            policy_chosen_logps=torch.tensor([-10.0, -12.0], requires_grad=True),
            policy_rejected_logps=torch.tensor([-11.0, -9.0]),
            ref_chosen_logps=torch.tensor([-10.5, -12.0]),
            ref_rejected_logps=torch.tensor([-10.5, -9.5]),
        )
        with_margin = compute_loss("dpo_margin", batch, beta=0.1, gamma=0.0)
        torch.testing.assert_close(with_margin.loss, compute_loss("dpo", batch, beta=0.1).loss)
        assert compute_loss("dpo_margin", batch, beta=0.1, gamma=0.5).loss > with_margin.loss
    finally:
        LOSSES.pop("dpo_margin", None)


@pytest.mark.parametrize("block", blocks("yaml"), ids=lambda b: b.where)
def test_every_yaml_block_is_a_valid_config(block, tmp_path):
    """Every YAML block of the README and the docs loads as a config: no misspelt key, no wrong type."""
    from pipeline.config import load_config
    from pipeline.training.losses import loss_weights

    path = tmp_path / "block.yaml"
    path.write_text(block.text)
    config = load_config(path)  # raises ConfigError naming the key
    loss_weights(config.train.loss)  # and the losses it names exist


def dpo_arguments(words: list[str]) -> list[str] | None:
    """The `dpo` arguments of a shell command: `dpo ...`, or `python jobs/<run|stage>.py ...` (also after
    `ray job submit ... --`); None for any other command."""
    if words[0] == "dpo" or words[0].endswith("/dpo"):
        return words[1:]
    for i, word in enumerate(words[:-1]):
        job = re.fullmatch(r"jobs/(?:(run)|(\w+)_stage)\.py", words[i + 1])
        if word.startswith("python") and job:
            return [job[1] or job[2], *words[i + 2 :]]
    return None


def dpo_commands():
    found = []
    for page in user_pages():
        for block, words in shell_commands(page):
            args = dpo_arguments(words)
            if args is not None:
                found.append(pytest.param(args, id=f"{block.where}: {' '.join(words)[:60]}"))
    return found


@pytest.mark.parametrize("args", dpo_commands())
def test_every_dpo_command_parses_and_its_settings_load(args):
    """Each `dpo` command line of a bash block parses with the real parser, and its --set overrides (each
    value of a sweep axis alone) load over its config: a repository config as it is, a user's from defaults."""
    from pipeline.cli.main import build_parser
    from pipeline.cli.sweep import split_overrides
    from pipeline.config import load_config
    from pipeline.training.losses import loss_weights

    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exit:
        pytest.fail(f"dpo {' '.join(args)}: the parser refuses it (exit {exit.code})")
    if getattr(parsed, "config", None) is None:  # dpo init, dpo tiny-model: parsing is all there is to check
        return
    config = ROOT / parsed.config if (ROOT / parsed.config).exists() else None
    plain, axes = split_overrides(parsed.overrides) if parsed.command == "sweep" else (parsed.overrides, {})
    if parsed.command == "sweep":
        assert axes, "dpo sweep needs a train.* key with a list of values"
    for key, values in [(None, [None]), *axes.items()]:
        for value in values:
            one = [f"{key}={json.dumps(value)}"] if key else []
            loss_weights(load_config(config, [*plain, *one]).train.loss)


def test_the_pages_show_dpo_commands():
    assert len(dpo_commands()) >= 20  # the quick start, training, the cluster, sweeps, scale


def test_every_repository_path_the_pages_name_exists():
    paths = [found for page in user_pages() for found in repository_paths(page)]
    assert len(paths) >= 50
    missing = [f"{where}: {path}" for where, path in paths if not resolve(path)]
    assert not missing, "named in the docs but not in the repository:\n" + "\n".join(missing)


def dotted_names() -> list[tuple[str, str]]:
    """(where, name) of every `pipeline.x.y` name in the pages' inline code."""
    return [
        (f"{page.relative_to(ROOT)}:{n}", span)
        for page in user_pages()
        for n, span in inline_code(page)
        if re.fullmatch(r"pipeline(\.\w+)+", span)
    ]


def defines(dotted: str) -> bool:
    """True when a module of the repository is `dotted`, or holds its last part as a name (read, not imported)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ROOT.joinpath(*parts[:cut])
        for source in (module.with_suffix(".py"), module / "__init__.py"):
            if source.is_file():
                rest = parts[cut:]
                return not rest or (len(rest) == 1 and re.search(rf"\b{rest[0]}\b", source.read_text()) is not None)
    return False


def test_every_pipeline_name_the_pages_name_exists():
    names = dotted_names()
    assert len(names) >= 5
    missing = [f"{where}: {name}" for where, name in names if not defines(name)]
    assert not missing, "named in the docs but not in the package:\n" + "\n".join(missing)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))


def test_every_make_target_the_pages_name_exists():
    named = set()
    for page in user_pages():
        texts = [span for _, span in inline_code(page)] + [b.text for b in code_blocks(page, "bash")]
        named |= {m for text in texts for m in re.findall(r"(?:^|\s)make (\w+)", text)}
    assert {"demo", "test", "docs", "venv"} <= named
    assert named <= makefile_targets(), f"not in the Makefile: {sorted(named - makefile_targets())}"


def test_the_readmes_links_reach_a_file_and_its_heading():
    from markdown.extensions.toc import slugify

    targets = [t for _, t in links(README) if "://" not in t]
    assert len(targets) >= 15
    for target in targets:
        path, _, anchor = target.partition("#")
        assert (ROOT / path).is_file(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
            assert anchor in {slugify(h, "-") for h in headings}, f"README links to {target}: no such heading"


def test_python_blocks_run_and_the_quick_start_config_fits_its_model(tmp_path, monkeypatch):
    """The quick start's Python (a tiny model from one's own data) runs in a fresh folder holding a file of
    the README's example rows, and a config block that names the model it made loads and fits its context."""
    from pipeline.config import load_config
    from pipeline.model.pretrained import context_length, load_model, load_tokenizer

    runnable = [b for b in blocks("python") if LOSS_EXAMPLE not in b.text]
    rows = [json.loads(line) for b in blocks("json") for line in b.text.splitlines() if line.strip()]
    assert runnable and rows
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 20))
    monkeypatch.chdir(tmp_path)
    for block in runnable:
        exec(compile(block.text, block.where, "exec"), {"__name__": "doc_block"})
    fitted = 0
    for i, block in enumerate(blocks("yaml")):
        (tmp_path / f"config{i}.yaml").write_text(block.text)
        config = load_config(tmp_path / f"config{i}.yaml")
        made = (tmp_path / "models").resolve()
        if made.is_dir() and made in (tmp_path / config.model.path).resolve().parents:
            known = context_length(config.model.path)
            assert known is not None, f"{config.model.path}: the model's config names no context length"
            context, _ = known
            assert config.tokenize.max_length <= context, f"{block.where}: tokenize.max_length past the model"
            tokenizer = load_tokenizer(config.model.path)
            assert tokenizer(rows[0]["prompt"] + rows[0]["chosen"])["input_ids"]
            assert load_model(config.model.path).config.vocab_size == len(tokenizer)
            fitted += 1
    assert fitted == 1, "one config block uses the model the quick start builds"
