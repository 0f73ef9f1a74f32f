"""Recipe validation: every error names the bad key and the allowed values."""

from __future__ import annotations

import pytest

from llmcomp.errors import RecipeError
from llmcomp.recipes import builtin_recipes, load_recipe, recipe_from_dict


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"passes": [{"type": "rtn", "bitz": 4}]}, r"passes\[0\] \(rtn\): unknown key 'bitz'; allowed keys: .*bits"),
        ({"passes": [{"type": "magic"}]}, r"unknown pass type 'magic'; allowed: .*rtn"),
        ({"passes": [{"type": "rtn", "bits": 5}]}, r"bits: Input should be 2, 3, 4 or 8 \(got 5\)"),
        ({"passes": []}, r"passes"),
        ({"passes": [{"type": "rtn"}], "colour": 1}, r"unknown key 'colour'"),
        ({"passes": [{"type": "wanda", "pattern": "4:2"}]}, r"pattern must be 'unstructured' or 'N:M'"),
        ({"passes": [{"type": "rtn", "overrides": {"*down*": {"bitz": 8}}}]},
         r"overrides\['\*down\*'\].*unknown key 'bitz'"),
        ({"calibration": {"num_samples": 0}, "passes": [{"type": "wanda"}]}, r"calibration.num_samples"),
        ([1, 2], r"expected a mapping"),
    ],
)
def test_invalid_recipes(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [type: rtn\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_builtin_recipes_all_validate():
    names = builtin_recipes()
    assert "rtn-w8" in names
    for name in names:
        assert load_recipe(name).passes


def test_overrides_apply_per_module():
    recipe = recipe_from_dict({"passes": [{"type": "rtn", "bits": 4, "ignore": ["*.q_proj"],
                                           "overrides": {"*.down_proj": {"bits": 8, "group_size": -1}}}]})
    p = recipe.build_passes()[0]
    assert p.config_for("model.layers.0.mlp.down_proj").bits == 8
    assert p.config_for("model.layers.0.mlp.down_proj").group_size == -1
    assert p.config_for("model.layers.0.mlp.up_proj").bits == 4
    assert not p.selects("model.layers.0.self_attn.q_proj")
    assert p.selects("model.layers.0.self_attn.k_proj")
