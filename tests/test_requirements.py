"""tests/helpers/requirements.py: a missing test tool skips the test on a developer's machine and fails
it in CI (CI=true), so that a broken CI installation cannot pass by skipping."""

from __future__ import annotations

import json

import pytest

from tests.helpers.requirements import in_ci, require


@pytest.mark.parametrize("value, expected", [("true", True), ("True", True), ("1", True), ("", False), ("0", False)])
def test_ci_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_an_installed_module_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require("json") is json


def test_a_missing_module_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs no_such_module_for_deconvnet_tests .*pip install"):
        require("no_such_module_for_deconvnet_tests")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require("no_such_module_for_deconvnet_tests")
