"""Tasks own their settings: the language model's model/data/sample blocks are its own registered schema, a task
can register blocks of its own, and neither the core config nor the trainer asks which task it runs."""

import ast
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from keel.config import describe_fields, dump_config, load_config
from keel.errors import KeelError

import keel

SRC = Path(keel.__file__).resolve().parent
CORE = ["config.py", "recipes.py", "data/seq_warmup.py",
        *(p.relative_to(SRC).as_posix() for p in (SRC / "train").glob("*.py"))]


@pytest.mark.parametrize("path", CORE)
def test_the_core_config_and_the_trainer_have_no_branch_on_a_task_name(path):
    """No comparison with a task's name ('lm', 'digits') in the core config, the recipes, the trainer or the
    techniques: what differs between tasks comes from the task's registration."""
    names = {"lm", "digits"}
    tree = ast.parse((SRC / path).read_text())
    branches = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)
                and any(isinstance(c, ast.Constant) and c.value in names for c in [node.left, *node.comparators])
                or isinstance(node, ast.Compare) and any(isinstance(c, (ast.Tuple, ast.List, ast.Set)) and any(
                    isinstance(e, ast.Constant) and e.value in names for e in c.elts) for c in node.comparators)]
    assert not branches, branches


def test_the_language_models_blocks_are_its_own_and_keep_their_names():
    from keel.task_registry import task_specs

    config = load_config(None, ["model.n_layer=2", "data.source=stdlib", "sample.tokens=0"])
    assert (config.model.n_layer, config.data.source, config.sample.tokens) == (2, "stdlib", 0)
    spec = task_specs()["lm"]
    assert {"data", "model", "sample"} <= set(spec.settings) and spec.recipe == "fast"
    digits = load_config(None, ["task=digits"])
    assert not {"model", "sample"} & set(yaml_keys(dump_config(digits)))
    assert "source" not in digits.data.model_dump()
    with pytest.raises(KeelError, match="model: a setting of task lm, not of task 'digits'"):
        load_config(None, ["task=digits", "model.n_layer=2"])
    with pytest.raises(KeelError, match=r"unknown key 'data.source' \(a setting of task lm\)"):
        load_config(None, ["task=digits", "data.source=stdlib"])


def yaml_keys(text):
    import yaml

    return yaml.safe_load(text)


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(8, ge=1, description="Width of the toy model.")


def test_a_registered_task_brings_its_own_block_help_and_recipe():
    from keel.task_registry import TaskSpec, register_task, task_specs

    register_task(TaskSpec("toy", "user_task:make", "a toy", settings={"toy": ToyConfig}, recipe="fast"))
    try:
        config = load_config(None, ["task=toy", "toy.width=3"])
        assert config.toy.width == 3 and config.recipe == "fast" and "model" not in yaml_keys(dump_config(config))
        assert any("toy.width = 8" in line and "(task toy)" in line for line in describe_fields())
        with pytest.raises(KeelError, match="toy.width"):
            load_config(None, ["task=toy", "toy.width=0"])
        with pytest.raises(KeelError, match="toy: a setting of task toy, not of task 'lm'"):
            load_config(None, ["toy.width=3"])
    finally:
        task_specs().pop("toy")
