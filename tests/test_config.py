"""Run configuration: YAML + --set overrides, unknown keys and wrong types named, the resolved copy."""

import pytest
import yaml

from peft_ds import PeftDsError
from peft_ds.config import check_world_size, load_config, write_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": {"method": "adapter", "sibo_lambda": 0.1},
                                    "train": {"lr": 1e-4, "epochs": 2}}))
    config = load_config(str(path), ["train.lr=1e-3", "method.target_modules=[gate_proj]", "train.resume=auto",
                                     "output_dir=/tmp/x", "data.validation_file=null"])
    assert config.method.method == "adapter" and config.method.sibo_lambda == 0.1
    assert config.train.lr == 1e-3 and config.train.epochs == 2.0 and isinstance(config.train.epochs, float)
    assert config.method.target_modules == ["gate_proj"] and config.train.resume == "auto"
    assert config.output_dir == "/tmp/x" and config.data.validation_file is None
    write_config(config, str(tmp_path / "resolved.yaml"))
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == config


@pytest.mark.parametrize("override,message", [
    ("train.learning_rate=1", "unknown config key train.learning_rate"),
    ("optimizer.lr=1", "unknown config key optimizer"),
    ("train.micro_batch_size=two", "train.micro_batch_size must be of type int"),
    ("train.micro_batch_size=2.5", "train.micro_batch_size must be of type int"),
    ("train.gradient_checkpointing=1", "train.gradient_checkpointing must be true or false"),
    ("method.target_modules=q_proj", "method.target_modules must be a list of strings"),
    ("train.resume=sometimes", "train.resume must be true, false or auto"),
    ("train.schedule=exponential", "train.schedule must be one of"),
    ("method.sibo_lambda=1.0", "sibo_lambda must be in"),
    ("method.method=lora2", "unknown method 'lora2'"),
    ("train.global_batch_size=10", "not a multiple of train.micro_batch_size"),
    ("model.dtype=int8", "model.dtype must be one of"),
    ("train", "--set expects section.key=value"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(PeftDsError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(PeftDsError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(PeftDsError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_world_size_must_divide_global_batch():
    config = load_config(None, ["train.micro_batch_size=4", "train.global_batch_size=16"])
    assert check_world_size(config, 1) == 4 and check_world_size(config, 4) == 1
    with pytest.raises(PeftDsError, match="world size 3 does not divide the global batch"):
        check_world_size(config, 3)


def test_shipped_configs_load():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = glob.glob(os.path.join(root, "configs", "*.yaml"))
    assert paths
    for path in paths:
        load_config(path)
