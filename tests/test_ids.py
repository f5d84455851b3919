from pathlib import Path

import pytest

from core.errors import InputError
from core.ids import safe_join, validate_id
from core.storage import RoiStore


@pytest.mark.parametrize("good", ["a", "station-1", "ROI_2.left", "x" * 64])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "../etc", "a/b", "a\\b", "x" * 65, ".hidden", "a b", "é", None, 3])
def test_invalid_ids(bad: object) -> None:
    with pytest.raises(InputError) as exc:
        validate_id(bad)
    assert exc.value.code == "invalid_id"


def test_store_cannot_escape_data_root(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        RoiStore(tmp_path, "..", "x")
    with pytest.raises(InputError):
        safe_join(tmp_path, "models", "../../etc")
    store = RoiStore(tmp_path, "r1", "roi.a")
    assert tmp_path.resolve() in store.root.parents


def test_a_long_id_is_not_echoed_whole() -> None:
    with pytest.raises(InputError) as err:
        validate_id("x" * 10_000, "roi_id")
    assert len(err.value.message) < 250 and "(cut)" in err.value.message
