"""Start-up choice of the draft tree size."""

import pytest

from server.config import ServerConfig
from server.engine.engine import Engine
from tiny_models import build_tiny_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    target, draft = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    config = ServerConfig(model=str(target), draft=str(draft), dtype="float32", device="cpu",
                          max_model_len=256, tree_depth=3, tree_top_k=3)
    engine = Engine(config)
    engine.load()
    return engine


def test_choice_is_best_of_table(engine):
    choice = engine.tree_size_choice
    sizes = [row[0] for row in choice.table]
    assert sizes == [1, 2, 4, 8, 16, 22]  # 22: the largest tree of depth 3 and top_k 3
    best = max(choice.table, key=lambda row: row[3])
    assert choice.total_tokens == best[0]
    if choice.total_tokens == 1:
        assert engine.decoder.draft is None
    else:
        assert engine.decoder.total_tokens == choice.total_tokens


def test_expected_tokens_grow_with_size(engine):
    committed = [row[2] for row in engine.tree_size_choice.table]
    assert committed[0] == 1.0
    assert all(later >= earlier for earlier, later in zip(committed, committed[1:]))
    assert all(row[1] > 0 for row in engine.tree_size_choice.table)


def test_fixed_size_skips_tuning(tmp_path_factory):
    target, draft = build_tiny_checkpoint(tmp_path_factory.mktemp("fixed"))
    engine = Engine(ServerConfig(model=str(target), draft=str(draft), dtype="float32", device="cpu",
                                 max_model_len=256, tree_total_tokens=6))
    engine.load()
    assert engine.tree_size_choice is None
    assert engine.decoder.total_tokens == 6
    assert engine.decoder.draft is not None
