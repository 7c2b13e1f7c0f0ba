from llmos.settings import Settings, normalise_db_url, redact


def test_embedded_defaults_live_under_home(tmp_path):
    s = Settings(home=tmp_path)
    assert s.embedded_db and s.embedded_redis
    assert s.db_url == f"sqlite:///{tmp_path.resolve()}/llmos.db"
    assert s.broker_url == f"unix://{tmp_path.resolve()}/redis.sock"
    assert s.kombu_url == f"llmos-redis+socket://{tmp_path.resolve()}/redis.sock"


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMOS_DATABASE_URL", "postgresql://u:secret@db:5432/llmos")
    monkeypatch.setenv("LLMOS_REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("LLMOS_MODELS", "minilm, other")
    s = Settings()
    assert s.db_url == "postgresql+psycopg://u:secret@db:5432/llmos"
    assert s.kombu_url == "llmos-redis://cache:6379/2"
    assert s.model_names == ["minilm", "other"]
    assert not s.embedded_db and not s.embedded_redis


def test_redact_hides_passwords():
    assert "secret" not in redact("postgresql+psycopg://u:secret@db/x")
    assert "secret" not in redact("redis://:secret@cache:6379/0")
    assert normalise_db_url("postgres://a@b/c") == "postgresql+psycopg://a@b/c"
