from __future__ import annotations

from pathlib import Path

import pytest

from ui.config import UiConfig, hash_password, parse_users
from vocab.errors import ConfigError, DataError
from vocab.feedback_store import Feedback, FeedbackStore


def test_users_file_env_and_hashed_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    f = tmp_path / "users"
    f.write_text(f"# clinicians\nalice:{hash_password('pw1', 1000)}\nbob:plain\n")
    cfg = UiConfig(users=UiConfig.load_users(f))
    assert cfg.authenticate("alice", "pw1") and not cfg.authenticate("alice", "pw2")
    assert cfg.authenticate("bob", "plain") and not cfg.authenticate("eve", "plain")
    monkeypatch.setenv("FEDSIGHT_UI_USERS", "carol:x,dan:y")
    assert dict(UiConfig.load_users(None)) == {"carol": "x", "dan": "y"}
    with pytest.raises(ConfigError, match="entry 1"):
        parse_users("nobody", "test")
    with pytest.raises(ConfigError, match="without users"):
        UiConfig(host="0.0.0.0")


def test_feedback_store_roundtrip_and_labels(tmp_path: Path):
    store = FeedbackStore.at_site(tmp_path)
    assert store.all() == [] and not (tmp_path / "feedback.db").exists()
    store.add(Feedback("c1", "v1", 0.8, 1, "agree"))
    store.add(Feedback("c2", "v1", 0.7, 1, "disagree", 0, "granuloma", "dr_a"))
    store.add(Feedback("c1", "v2", 0.3, 0, "disagree", 1))
    rows = store.all()
    assert [r.case_id for r in rows] == ["c1", "c2", "c1"] and rows[1].comment == "granuloma"
    assert store.labels() == {"c1": 1, "c2": 0}  # latest feedback per case wins
    with pytest.raises(DataError, match="corrected diagnosis"):
        Feedback("c3", "v1", 0.5, 1, "disagree")
    with pytest.raises(DataError, match="verdict"):
        Feedback("c3", "v1", 0.5, 1, "maybe")  # type: ignore[arg-type]


def test_cli_registers_ui():
    from cli.main import build_parser

    args = build_parser().parse_args(["ui", "--site", "s", "--model", "m", "--port", "9000"])
    assert args.port == 9000 and args.site == Path("s") and args.host == "127.0.0.1"


def test_served_model_from_store_version_and_file(tmp_path: Path):
    from coordinator.store import ModelStore
    from multimodal.checkpoint import save_checkpoint
    from tests.explain.fixtures import tiny_model
    from ui.model_source import load_served_model
    from vocab.errors import CheckpointError

    model = tiny_model()
    store = ModelStore(tmp_path / "store")
    with pytest.raises(CheckpointError, match="no model"):
        load_served_model(tmp_path / "store", "site_a")
    v = store.add_version(lambda p: save_checkpoint(model, p),
                          {"round": 3, "metrics": {"hospitals": {"site_a": {"auc": 0.81,
                                                                            "ece": 0.05}}}})
    (tmp_path / "store" / "clinical.json").write_text('{"version": null, "history": []}')
    with pytest.raises(CheckpointError, match="no clinical version"):
        load_served_model(tmp_path / "store", "site_a")
    store.promote(v.id)
    served = load_served_model(tmp_path / "store", "site_a")
    assert served.version == v.id and served.round == 3
    assert served.site_metrics == {"auc": 0.81, "ece": 0.05}
    assert served.model.temperature == pytest.approx(model.temperature)
    assert load_served_model(v.path, "site_b").site_metrics == {}
    assert load_served_model(v.model_path, "site_a").version == "file:model.pt"
