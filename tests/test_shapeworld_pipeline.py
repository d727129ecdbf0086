"""Shape-world pipeline steps of our own (the WoHG data writer, the export) and the shipped default model's form."""

import json
import sys

import pytest
import torch
from conftest import FIXTURES, REPO_ROOT
from safetensors.torch import load_file

from armor.wohg_data import read_conversations
from armor_package import CODE_FILES

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import shapeworld_data  # noqa: E402
import shapeworld_export  # noqa: E402

SHIPPED = REPO_ROOT / "armor-shapeworld"
COUNTS = ["--ti2t", "3", "--t2t", "2", "--t2i", "5", "--t2ti", "2", "--ti2ti", "2", "--parts", "2", "--workers", "1"]


def test_data_writer_gives_one_readable_folder_per_kind_and_reuses_it(tmp_path):
    shapeworld_data.main(["--output-dir", str(tmp_path), *COUNTS])
    assert sorted(p.name for p in (tmp_path / "t2i").glob("*.jsonl")) == ["part-00.jsonl", "part-01.jsonl"]
    conversations, skipped = read_conversations([tmp_path / "t2i", tmp_path / "ti2ti"], False, True)
    assert not skipped
    assert [c.kind for c in conversations] == ["t2i"] * 5 + ["ti2ti"] * 2
    assert all(path.is_file() for c in conversations for path in (i.path for i in c.images(target=True)))
    before = (tmp_path / "t2i" / "part-00.jsonl").read_bytes()
    shapeworld_data.main(["--output-dir", str(tmp_path), *COUNTS])  # same options: reused as is
    assert (tmp_path / "t2i" / "part-00.jsonl").read_bytes() == before


def test_data_writer_refuses_a_folder_written_with_other_options(tmp_path):
    shapeworld_data.main(["--output-dir", str(tmp_path), *COUNTS])
    with pytest.raises(ValueError, match="written with other options"):
        shapeworld_data.main(["--output-dir", str(tmp_path), *COUNTS[:-4], "--parts", "1", "--workers", "1"])


def test_shipped_model_is_bfloat16_with_the_repositorys_code_files():
    for name in CODE_FILES:
        link = SHIPPED / name
        assert link.is_symlink() and link.resolve() == REPO_ROOT / name
    weights = load_file(SHIPPED / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    config = json.loads((SHIPPED / "config.json").read_text())
    assert (config["model_type"], config["num_image_codes"], config["dtype"]) == ("armor", 256, "bfloat16")


def test_export_writes_a_loadable_bfloat16_copy_without_training_leftovers(tmp_path):
    output = tmp_path / "exported"
    shapeworld_export.main([str(SHIPPED), "--output", str(output)])
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in SHIPPED.iterdir())
    original, copy = load_file(SHIPPED / "model.safetensors"), load_file(output / "model.safetensors")
    assert original.keys() == copy.keys() and all(torch.equal(original[k], copy[k]) for k in original)
    assert (output / "modeling_armor.py").resolve() == REPO_ROOT / "modeling_armor.py"
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no staging folder left behind


def test_export_refuses_what_is_not_an_armor_checkpoint_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="not an ARMOR checkpoint"):
        shapeworld_export.export(FIXTURES / "internvl2_5-tiny-qwen2", tmp_path / "out")
    assert not list(tmp_path.iterdir())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(SystemExit):
        shapeworld_export.main([str(SHIPPED), "--output", str(tmp_path / "taken")])
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["file"]
