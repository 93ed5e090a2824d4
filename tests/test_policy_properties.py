"""Property tests of the policy parser: any JSON gives a valid GuardPolicy or a PolicyError."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlmguard.runtime.policy import GuardPolicy, PolicyError

GUARDS = ["oh", "ptr", "align", "detector"]
KNOWN = ["oh_threshold", "ptr_k_fraction", "align_gamma", "detector_threshold", "require"]
KNOWN += ["fail_open", "oh_safety_instruction", "oh_refusal_opening", "align_safety_prefix"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()  # NaN and the infinities included, as json.loads accepts them
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-1000, 1000)
GOOD = {
    "oh_threshold": st.none() | finite,
    "ptr_k_fraction": st.floats(0.0, 1.0) | st.sampled_from([0, 1]),
    "align_gamma": st.none() | st.lists(finite, max_size=6),
    "detector_threshold": st.none() | finite,
    "require": st.lists(st.sampled_from(GUARDS), max_size=4),
    "fail_open": st.booleans(),
    "oh_safety_instruction": st.text(max_size=40),
    "oh_refusal_opening": st.text(max_size=10),
    "align_safety_prefix": st.text(max_size=40),
}
good_policies = st.fixed_dictionaries({}, optional=GOOD)
# Known keys with good or arbitrary values, sometimes with an unknown key among them.
mixed_policies = st.fixed_dictionaries(
    {}, optional={key: good | json_values for key, good in GOOD.items()}
) | st.dictionaries(st.sampled_from(KNOWN) | st.text(max_size=12), json_values, max_size=5)


def _parse(value: object) -> GuardPolicy | None:
    """from_dict's answer: a policy, or None for a PolicyError (anything else fails the test)."""
    try:
        return GuardPolicy.from_dict(value)
    except PolicyError as err:
        assert str(err) and "\n" not in str(err)
        return None


def _assert_usable(policy: GuardPolicy) -> None:
    """What the runtime relies on, checked independently of validate()."""
    for threshold in (policy.oh_threshold, policy.detector_threshold):
        assert threshold is None or (
            type(threshold) in (int, float) and math.isfinite(float(threshold))
        )
    assert type(policy.ptr_k_fraction) in (int, float) and 0 <= policy.ptr_k_fraction <= 1
    gamma = policy.align_gamma
    assert gamma is None or all(type(g) in (int, float) and math.isfinite(g) for g in gamma)
    assert isinstance(policy.require, list) and set(policy.require) <= set(GUARDS)
    assert isinstance(policy.fail_open, bool)
    texts = policy.oh_safety_instruction, policy.oh_refusal_opening, policy.align_safety_prefix
    assert all(isinstance(text, str) for text in texts)
    again = GuardPolicy.from_dict(json.loads(json.dumps(policy.to_dict(), allow_nan=False)))
    assert again == policy


@given(json_values)
def test_any_json_value_is_a_policy_or_a_policy_error(value):
    policy = _parse(value)
    if policy is not None:
        _assert_usable(policy)


@given(mixed_policies)
def test_any_policy_shaped_object_is_a_policy_or_a_policy_error(data):
    policy = _parse(data)
    if policy is not None:
        _assert_usable(policy)
        assert set(data) <= set(KNOWN)


@given(good_policies)
def test_every_well_formed_policy_is_accepted_and_round_trips(data):
    policy = GuardPolicy.from_dict(data)
    _assert_usable(policy)
    assert {key: getattr(policy, key) for key in data} == data


@given(st.dictionaries(st.text(max_size=12), json_values, min_size=1, max_size=4))
def test_unknown_keys_are_refused_by_name(data):
    unknown = sorted(key for key in data if key not in KNOWN)
    if not unknown:
        return
    with pytest.raises(PolicyError, match="unknown policy key"):
        GuardPolicy.from_dict(data)


_FILES = st.one_of(
    json_values.map(lambda v: json.dumps(v)),  # NaN and Infinity are written as such
    json_values.map(lambda v: json.dumps({"policy": v, "calibration": {}})),
    mixed_policies.map(json.dumps),
    st.text(max_size=40),
    st.just("[" * 100_000),  # deeper than json's recursion limit
)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """Where the file tests write their policies."""
    return tmp_path_factory.mktemp("policies")


@given(text=_FILES)
def test_any_policy_file_loads_or_raises_a_policy_error(policy_dir, text):
    path = policy_dir / "policy.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        policy = GuardPolicy.load(path)
    except PolicyError as err:
        assert "\n" not in str(err)
        return
    _assert_usable(policy)


def test_a_missing_or_binary_policy_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy"):
        GuardPolicy.load(tmp_path / "absent.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PolicyError, match="cannot read policy"):
        GuardPolicy.load(tmp_path / "binary.json")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"ptr_k_fraction": "0.5"}, "ptr_k_fraction must be a number"),
        ({"ptr_k_fraction": None}, "ptr_k_fraction must be a number"),
        ({"ptr_k_fraction": True}, "ptr_k_fraction must be a number"),
        ({"oh_threshold": 10**400}, "oh_threshold must be a finite number"),
        ({"oh_threshold": False}, "oh_threshold must be a finite number"),
        ({"require": "oh"}, "require must be a list"),
        ({"require": [["oh"]]}, "require must be a list"),
        ({"require": {"oh": 1}}, "require must be a list"),
        ({"align_gamma": [0.1, "x"]}, "align_gamma must be a list"),
        ({"align_gamma": 0.3}, "align_gamma must be a list"),
        ({"fail_open": "false"}, "fail_open must be true or false"),
        ({"oh_refusal_opening": None}, "oh_refusal_opening must be a string"),
        ({1: 2}, "unknown policy key"),
        ([], "must be a JSON object"),
    ],
)
def test_wrong_types_are_named(data, message):
    with pytest.raises(PolicyError, match=message):
        GuardPolicy.from_dict(data)
