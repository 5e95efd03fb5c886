import io
import json
import logging

from ops.logging import configure_logging, redact, request_id_var


def _capture(secrets=()):
    stream = io.StringIO()
    configure_logging("INFO", secrets=secrets, stream=stream)
    return stream


def test_log_lines_are_json_with_the_current_request_id():
    stream = _capture()
    token = request_id_var.set("req-123")
    try:
        logging.getLogger("fintide.test").info("hello %s", "world", extra={"amount_minor": 5})
    finally:
        request_id_var.reset(token)
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["msg"] == "hello world" and line["request_id"] == "req-123"
    assert line["level"] == "INFO" and line["amount_minor"] == 5


def test_configured_secrets_never_reach_the_log():
    stream = _capture(secrets=("s3cr3t-value",))
    logging.getLogger("fintide.test").warning("connecting with s3cr3t-value now")
    assert "s3cr3t-value" not in stream.getvalue()


def test_credential_shapes_are_masked_even_when_not_configured():
    text = redact('password=abc token: xyz Authorization="Bearer eyJhbGciOi.x.y" '
                  "postgresql://u:pw@h/db")
    for leaked in ("abc", "xyz", "eyJhbGciOi", ":pw@"):
        assert leaked not in text


def test_exceptions_are_logged_with_their_traceback():
    stream = _capture()
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("fintide.test").exception("failed")
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert "ValueError: boom" in line["exc"]
