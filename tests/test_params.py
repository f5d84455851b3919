"""One request-parameter schema for every transport (agent/jobs.py Params): what each ingress hands in is read,
or refused with the same code, whichever way it came (form strings, JSON values, v5 user properties)."""

from __future__ import annotations

import pytest

from agent.jobs import Params
from core.errors import InputError


@pytest.mark.parametrize("raw, expect", [
    ({"heatmap": True}, True), ({"heatmap": "true"}, True), ({"heatmap": "Yes"}, True), ({"heatmap": 1}, True),
    ({"heatmap": "false"}, False), ({"heatmap": "0"}, False), ({"heatmap": False}, False),
    ({"heatmap": ""}, None), ({}, None),
])
def test_flags_read_the_same_from_strings_and_json(raw: dict, expect: bool | None) -> None:
    assert Params.of(raw).heatmap is expect


@pytest.mark.parametrize("key", ["heatmap", "reset", "relabel"])
@pytest.mark.parametrize("value", ["garbage", 2, 0.5, [], {}])
def test_a_flag_that_is_none_is_refused_not_read_as_false(key: str, value: object) -> None:
    with pytest.raises(InputError) as exc:
        Params.of({key: value})
    assert exc.value.code == "invalid_field" and key in exc.value.message


@pytest.mark.parametrize("key, code", [("threshold", "invalid_threshold"), ("ok_percentile", "invalid_policy"),
                                       ("ng_margin", "invalid_policy"), ("ng_recall", "invalid_policy")])
@pytest.mark.parametrize("value", ["abc", "nan", "inf", True, [1]])
def test_numbers_that_are_not_finite_numbers_are_refused_with_their_code(key: str, code: str, value: object) -> None:
    with pytest.raises(InputError) as exc:
        Params.of({key: value})
    assert exc.value.code == code


def test_text_from_outside_is_encoded_and_bounded_and_unknown_keys_ignored() -> None:
    p = Params.of({"source": "cam\n1\x00", "file_name": "x" * 500, "threshold": "0.25", "reset": "on",
                   "image_b64": "AAAA", "sample_ids": ["a", "b"]})
    assert "\n" not in p.source and "\x00" not in p.source
    assert len(p.file_name or "") <= 200 and p.threshold == 0.25 and p.reset is True and p.sample_ids == ["a", "b"]
