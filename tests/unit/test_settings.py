import pytest

from ops.settings import DEV_JWT_SECRET, load_settings


def test_settings_read_prefixed_environment_variables_with_types():
    s = load_settings(environ={"FINTIDE_API_PORT": "9001", "FINTIDE_FEED_ENABLED": "false",
                               "FINTIDE_DATA_DIR": "/tmp/x"})
    assert s.api_port == 9001 and s.feed_enabled is False and s.data_dir == "/tmp/x"


def test_cli_overrides_win_over_environment():
    s = load_settings(environ={"FINTIDE_API_PORT": "9001"}, api_port=9002)
    assert s.api_port == 9002


def test_defaults_match_the_readme_quick_start():
    s = load_settings(environ={})
    assert (s.api_port, s.data_dir, s.env) == (8000, ".fintide", "dev")


def test_a_malformed_number_is_a_clear_error():
    with pytest.raises(Exception, match="api_port"):
        load_settings(environ={"FINTIDE_API_PORT": "eighty"})


def test_prod_refuses_the_dev_jwt_secret():
    with pytest.raises(ValueError, match="JWT_SECRET"):
        load_settings(environ={"FINTIDE_ENV": "prod"})
    assert load_settings(environ={"FINTIDE_ENV": "prod", "FINTIDE_JWT_SECRET": "x" * 40}).env == "prod"


def test_short_jwt_secrets_are_rejected():
    with pytest.raises(ValueError, match="32"):
        load_settings(environ={"FINTIDE_JWT_SECRET": "short"})


def test_redacted_settings_hide_secrets_and_url_passwords():
    s = load_settings(environ={"FINTIDE_DATABASE_URL": "postgresql://app:hunter2@db:5432/f",
                               "FINTIDE_ADMIN_PASSWORD": "adminpw"})
    shown = str(s.redacted())
    assert "hunter2" not in shown and "adminpw" not in shown and DEV_JWT_SECRET not in shown
    assert "postgresql://app:***@db:5432/f" in shown
