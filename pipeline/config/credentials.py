"""Credentials never ride inside a URI: every URI we use is printed and written (manifests, logs,
report.md, Ray Train's storage path), so a config that holds one is refused, naming where they belong."""

from __future__ import annotations

import re
from typing import Any

from pipeline.config.sections import ConfigError

# Where each scheme's credentials belong instead of inside a URI.
CREDENTIAL_ENV = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS",
    "abfs": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
    "hf": "HF_TOKEN",
    "http": "an environment variable named by the key's `*_env` setting (evaluate.judge_api.api_key_env)",
    "https": "an environment variable named by the key's `*_env` setting (evaluate.judge_api.api_key_env)",
}
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)@")
_SECRET_QUERY = re.compile(r"[?&](access_key|secret_key|session_token|token|password|sig|signature)=", re.IGNORECASE)


def refuse_credentials(value: str, *, where: str) -> None:
    """ConfigError when a URI carries credentials (`s3://KEY:SECRET@bucket/...`, `?secret_key=`): every
    URI we use is printed and written (manifests, logs, report.md, Ray Train's storage path). The
    message shows the URI with the secret cut out and names the environment variables to use."""
    userinfo, query = _USERINFO.match(value), _SECRET_QUERY.search(value)
    scheme = value.split("://", 1)[0].lower()
    if userinfo:
        shown = f"{scheme}://***@{value[userinfo.end() :]}"
    elif query:
        shown = value[: query.start()] + "?***"
    else:
        return
    env = CREDENTIAL_ENV.get(scheme, "the filesystem's own environment variables")
    raise ConfigError(
        f"{where}: {shown} carries credentials inside the URI, which would be printed and written "
        f"wherever the URI is; remove them and set {env} in the environment instead"
    )


def refuse_credentials_in(tree: Any, *, prefix: str) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            refuse_credentials_in(value, prefix=f"{prefix}{key}.")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            refuse_credentials_in(value, prefix=f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(tree, str) and "://" in tree:
        refuse_credentials(tree, where=prefix.rstrip("."))
