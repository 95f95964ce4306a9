"""docs/settings.md against the settings class, every documented variable against what the code reads, and
the warning when a command creates a new NOISEWISE_HOME."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from noisewise.services import settings as settings_module
from noisewise.services.settings import (
    REGENERATE,
    Settings,
    SettingsError,
    ensure_home,
    home_path,
    markdown,
    reference,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "settings.md"
SETTINGS_FIELDS = [f for f in fields(Settings) if f.name != "auth"]


def test_docs_settings_md_is_up_to_date():
    assert DOC.is_file(), f"docs/settings.md is missing: run `{REGENERATE}`"
    assert DOC.read_text() == markdown(), f"docs/settings.md is out of date with the settings class: run `{REGENERATE}`"


def test_the_module_prints_the_reference():
    """The regeneration command itself, as the user runs it."""
    result = subprocess.run([sys.executable, "-m", "noisewise.services.settings", "--markdown"], capture_output=True,
                            text=True, timeout=60, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == markdown()


def test_every_field_has_a_row_with_its_variable_and_default():
    rows = {v.env: v for v in reference()}
    assert len(rows) == len(reference()), "a variable listed twice"
    table = DOC.read_text()
    for f in SETTINGS_FIELDS:
        env = f.metadata["env"]
        assert rows[env].field == f.name and len(rows[env].description) > 10, f.name
        assert re.search(rf"^\| `{env}` \| `{f.name}` \| [^|]+ \| ", table, re.MULTILINE), env
    # numbers shown as the code's defaults
    assert rows["NOISEWISE_MAX_IMAGE_PIXELS"].default == f"`{4096 * 4096}`"
    assert rows["NOISEWISE_BATCHING"].default == "`1`"
    assert rows["NOISEWISE_RELOAD_INTERVAL_S"].default == "`5`"


def _other_value(f) -> str:
    """A valid value of a field's variable that differs from its default, as the environment would hold it."""
    if f.type in ("bool", bool):
        return "0" if f.default else "1"
    if f.type in ("int", int):
        return str(f.default + 7)
    if f.type in ("float", float):
        return str(f.default + 1.5)
    return {"model": "someone-else@staging", "device": "cpu"}[f.name]


@pytest.mark.parametrize("f", SETTINGS_FIELDS, ids=[f.name for f in SETTINGS_FIELDS])
def test_each_documented_variable_sets_its_field(f):
    env = f.metadata["env"]
    text = _other_value(f)
    value = getattr(Settings.from_env({env: text}), f.name)
    parse = {"bool": lambda t: t == "1", "int": int, "float": float}.get(f.type, str)
    expected = parse(text)
    assert value == expected != f.default
    # and a bad value is refused with a message that names the variable
    bad = {"bool": "maybe", "int": "-3", "float": "soon"}.get(f.type, "@ x")
    with pytest.raises(SettingsError, match=rf"^{env}: "):
        Settings.from_env({env: bad})


def test_auth_variables_are_the_ones_auth_reads(tmp_path):
    from noisewise.services import auth

    documented = {v.env for v in settings_module.AUTH_VARIABLES}
    assert documented == {auth.KEYS_ENV, auth.KEYS_FILE_ENV, auth.PREDICT_ENV, auth.METRICS_ENV}
    with pytest.raises(SettingsError, match=rf"^{auth.KEYS_ENV}: key 1 of 1 has 5 characters"):
        Settings.from_env({auth.KEYS_ENV: "short"})
    with pytest.raises(SettingsError, match=auth.KEYS_ENV):  # protection asked for, without any key
        Settings.from_env({auth.PREDICT_ENV: "1"})
    assert Settings.from_env({auth.KEYS_ENV: "k" * 20, auth.METRICS_ENV: "1"}).auth.metrics is True


def test_every_variable_the_code_reads_is_documented():
    """Each ``"NOISEWISE_..."`` literal in the package source names a documented variable."""
    documented = {v.env for v in reference()}
    found = set()
    for folder in ("services", "models", "monitoring", "src"):
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(re.findall(r"[\"'](NOISEWISE_[A-Z0-9_]+)[\"']", path.read_text()))
    assert len(found) >= 20
    assert found - documented == set()
    from noisewise.monitoring.store import STORE_URL_ENV
    from noisewise.services.client import API_KEY_ENV

    assert {STORE_URL_ENV, API_KEY_ENV, "NOISEWISE_HOME", "MLFLOW_TRACKING_URI"} <= documented


# ---------------------------------------------------------------- NOISEWISE_HOME

def test_a_new_home_is_created_and_reported(tmp_path):
    home = tmp_path / "elsewhere" / "state"
    out = io.StringIO()
    assert ensure_home({"NOISEWISE_HOME": str(home)}, stream=out) == home
    assert home.is_dir()
    warning = out.getvalue()
    assert warning.count("\n") == 1 and warning.startswith("noisewise: warning: created")
    assert str(home) in warning and "NOISEWISE_HOME=" in warning
    # the second time it exists: nothing to say
    again = io.StringIO()
    assert ensure_home({"NOISEWISE_HOME": str(home)}, stream=again) == home
    assert again.getvalue() == ""


def test_the_default_home_is_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    home = ensure_home({}, stream=out)
    assert home == tmp_path / ".noisewise" and home.is_absolute() and home.is_dir()
    assert f"created a new, empty state directory {tmp_path / '.noisewise'} " in out.getvalue()
    assert "NOISEWISE_HOME is not set" in out.getvalue()
    assert home_path({"NOISEWISE_HOME": "  "}) == home  # blank: the default, as for every other variable


def test_a_relative_home_is_reported_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    ensure_home({"NOISEWISE_HOME": "rel/home"}, stream=out)
    assert str(tmp_path / "rel" / "home") in out.getvalue() and "'rel/home'" in out.getvalue()


def test_a_file_in_the_way_is_a_clear_error(tmp_path):
    blocker = tmp_path / "home"
    blocker.write_text("not a directory")
    with pytest.raises(SettingsError, match=rf"^NOISEWISE_HOME: {re.escape(str(blocker))} exists and is not a dir"):
        ensure_home({"NOISEWISE_HOME": str(blocker)}, stream=io.StringIO())


def test_the_warning_goes_to_stderr_of_a_real_process(tmp_path):
    """What a user running a command from another directory sees: the warning on stderr, nothing on stdout."""
    code = "from noisewise.services.settings import ensure_home; print(ensure_home())"
    env = {k: v for k, v in os.environ.items() if k != "NOISEWISE_HOME"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / ".noisewise")
    assert f"created a new, empty state directory {tmp_path / '.noisewise'}" in result.stderr
