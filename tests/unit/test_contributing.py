"""CONTRIBUTING.md's recipes, followed as written: its toy loss trains through the real train step, and its
toy judge and reward, declared as entry points of a package, are found by name and judge a pair."""

import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.doc_pages import CONTRIBUTING, repository_paths, resolve, section_blocks
from tests.helpers.micro_batches import pair_rows

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

CPU = torch.device("cpu")


def config_of(block, tmp_path):
    from pipeline.config import load_config

    path = tmp_path / "recipe.yaml"
    path.write_text(block.text)
    return load_config(path)


def test_the_loss_recipe_trains_through_the_train_step(tiny_model_dir, tmp_path):
    from pipeline.model.pretrained import load_model, load_tokenizer
    from pipeline.training.losses import LOSSES, loss_weights
    from pipeline.training.objectives import PairObjective, objective_for
    from pipeline.training.step import train_step

    (code,) = section_blocks(CONTRIBUTING, "Add a loss", "python")
    (settings,) = section_blocks(CONTRIBUTING, "Add a loss", "yaml")
    before = set(LOSSES)
    exec(compile(code.text, code.where, "exec"), {"__name__": "contributing_loss"})
    (name,) = set(LOSSES) - before
    try:
        train = config_of(settings, tmp_path).train
        assert train.loss == name and loss_weights({name: 1.0, "sft": 0.1}) == {name: 1.0, "sft": 0.1}
        model = load_model(str(tiny_model_dir))
        objective = objective_for(
            train, pad_id=load_tokenizer(str(tiny_model_dir)).pad_token_id, device=CPU, with_reference=True
        )
        assert isinstance(objective, PairObjective)  # what the train worker builds for a paired loss
        batch = pair_rows(8)
        with torch.no_grad():  # the documented loss, softplus(gamma - margin), from the policy before the step
            pair, _ = objective.pair_logps(model, batch)
            ref_chosen, ref_rejected = pair.ref_chosen_logps, pair.ref_rejected_logps
            assert ref_chosen is not None and ref_rejected is not None
            chosen = train.beta * (pair.policy_chosen_logps - ref_chosen)
            rejected = train.beta * (pair.policy_rejected_logps - ref_rejected)
            expected = F.softplus(train.gamma - (chosen - rejected)).mean().item()
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.AdamW(model.parameters())  # train_step sets the step's learning rate
        steps = [
            train_step(model, optimizer, [batch], objective=objective, lr=1e-3, max_grad_norm=1.0) for _ in range(4)
        ]
        assert all(step.updated for step in steps)
        assert steps[0].loss_metrics["loss"] == pytest.approx(expected, abs=1e-5)
        assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
        first, last = steps[0].loss_metrics["loss"], steps[-1].loss_metrics["loss"]
        assert first is not None and last is not None and last < first  # the same pairs, four steps on
    finally:
        LOSSES.pop(name, None)


def install_task(tmp_path, module_code: str, entry_points: dict[str, dict[str, str]]) -> list[str]:
    """What `pip install` of the recipe's task package leaves on the path: its module, and its distribution's
    metadata with the entry points (importlib.metadata reads nothing else). Returns the modules written."""
    (module,) = {target.split(":")[0] for group in entry_points.values() for target in group.values()}
    parts = module.split(".")
    for depth in range(1, len(parts)):
        package = tmp_path.joinpath(*parts[:depth])
        package.mkdir(exist_ok=True)
        (package / "__init__.py").touch()
    tmp_path.joinpath(*parts[:-1], f"{parts[-1]}.py").write_text(module_code)
    dist = tmp_path / "my_task-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-task\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in names.items()) + "\n"
            for group, names in entry_points.items()
        )
    )
    return [".".join(parts[:depth]) for depth in range(1, len(parts) + 1)]


def test_the_judge_and_reward_recipe_is_found_by_name_and_judges(tmp_path, monkeypatch):
    from pipeline.evaluation import plugins
    from pipeline.evaluation.judges import judge_both_orders

    heading = "Add a judge or a reward"
    (code,) = section_blocks(CONTRIBUTING, heading, "python")
    (declaration,) = section_blocks(CONTRIBUTING, heading, "toml")
    (settings,) = section_blocks(CONTRIBUTING, heading, "yaml")
    entry_points = tomllib.loads(declaration.text)["project"]["entry-points"]
    assert set(entry_points) == {plugins.REWARD_GROUP, plugins.JUDGE_GROUP}
    site = tmp_path / "site"
    site.mkdir()
    modules = install_task(site, code.text, entry_points)
    monkeypatch.syspath_prepend(str(site))
    try:
        evaluate = config_of(settings, tmp_path).evaluate
        plugins.check_judge(evaluate)  # the check `dpo run` makes before its first stage
        judge = plugins.make_judge(evaluate)
        assert evaluate.judge in plugins.registered(plugins.JUDGE_GROUP)
        prompts = ["Q:", "Q:", "Q:"]
        short, long = ["two words", "one two three four", "a b"], ["one two three", "one", "c d"]
        assert judge.judge(prompts, short, long) == ["A", "B", "tie"]
        result = judge_both_orders(judge, prompts, short, long)  # policy first, then baseline first
        assert result.scores.tolist() == [1.0, 0.0, 0.5] and (result.wins, result.losses, result.ties) == (1, 1, 1)
        reward = plugins.make_reward(evaluate.reward)
        assert reward is not None
        assert reward(["Q: one two", "Q: one"]).tolist() == [-3.0, -2.0]
    finally:
        for module in modules:
            sys.modules.pop(module, None)


def test_every_path_the_recipes_name_exists():
    paths = repository_paths(CONTRIBUTING)
    assert len(paths) >= 15
    missing = [f"{where}: {path}" for where, path in paths if not resolve(path)]
    assert not missing, "CONTRIBUTING.md names what is not in the repository:\n" + "\n".join(missing)
