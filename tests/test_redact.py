"""redact_uri: passwords and credential parameters never leave in a printed or logged URI."""

from __future__ import annotations

import pytest

from mmflow.redact import redact_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
        (
            "postgresql+psycopg2://mlflow:s3cr3t@db.internal:5432/mlflow",
            "postgresql+psycopg2://mlflow:***@db.internal:5432/mlflow",
        ),
        ("http://user:pw@host", "http://user:***@host"),
        ("https://user:pw@host:5000/path?x=1", "https://user:***@host:5000/path?x=1"),
        ("mysql://root:p@ss@host/db", "mysql://root:***@host/db"),  # '@' inside the password
        ("http://user:@host", "http://user:***@host"),
        (
            "https://x-access-token:ghp_abc@github.com/o/r.git",
            "https://x-access-token:***@github.com/o/r.git",
        ),
        ("http://host:5000?token=abc123", "http://host:5000?token=***"),
        ("https://host/p?a=1&token=abc&b=2", "https://host/p?a=1&token=***&b=2"),
        ("https://host/p?access_token=abc#frag", "https://host/p?access_token=***#frag"),
        ("https://host/cb#access_token=abc&state=1", "https://host/cb#access_token=***&state=1"),
        (
            "https://bucket.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Date=20240101T000000Z"
            "&X-Amz-Security-Token=FQo&X-Amz-Signature=deadbeef",
            "https://bucket.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=***&X-Amz-Date=20240101T000000Z"
            "&X-Amz-Security-Token=***&X-Amz-Signature=***",
        ),
        (
            "https://acct.blob.core.windows.net/c/b?sv=2020&sig=abc%3D",
            "https://acct.blob.core.windows.net/c/b?sv=2020&sig=***",
        ),
        (
            "https://api.example.com/v1?api_key=k1&apikey=k2&key=k3&password=p&client_secret=c",
            "https://api.example.com/v1?api_key=***&apikey=***&key=***&password=***"
            "&client_secret=***",
        ),
        ("http://u:p@host/x?token=t", "http://u:***@host/x?token=***"),
    ],
)
def test_secrets_are_masked(uri, expected):
    assert redact_uri(uri) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sqlite:///mlflow.db",
        "sqlite:////abs/path/mlflow.db",
        "s3://bucket/mmflow/pipe/stage/0123456789abcdef/shards",
        "/local/path/with:colon@sign",
        "file:///tmp/x",
        "http://127.0.0.1:5000",
        "postgresql://user@host/db",  # a user name alone is not a credential
        "s3://bucket/model@v2/weights.safetensors",  # '@' in a path, not in the authority
        "https://host/p?page=2&size=10",
        "https://host/p?token=",  # nothing to hide
        "no uri here: user:pw@host",
    ],
)
def test_everything_else_is_unchanged(text):
    assert redact_uri(text) == text


def test_every_uri_in_a_command_line():
    cmd = (
        "mmflow run p.yaml --tracking-uri postgresql://me:hunter2@db/mlflow "
        "--storage s3://b/x --set a.params.url=https://h/f?token=abc"
    )
    out = redact_uri(cmd)
    assert "hunter2" not in out and "abc" not in out
    assert out == (
        "mmflow run p.yaml --tracking-uri postgresql://me:***@db/mlflow "
        "--storage s3://b/x --set a.params.url=https://h/f?token=***"
    )


def test_idempotent():
    once = redact_uri("http://u:p@h/x?sig=s")
    assert redact_uri(once) == once
