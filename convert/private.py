"""What must not leave the machine in a published model's text files: local absolute paths, the user's
home directory and name, and tokens from the environment. `find_private` lists them (never a token's
value, only where it came from); `redact_text` replaces them."""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".yaml", ".yml", ".jinja")
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET", re.IGNORECASE)
MIN_SECRET_LENGTH = 8
REDACTED = "<redacted>"
USER_PLACEHOLDER = "<user>"
# Folders under which a path names a person or a machine, whether or not it exists here.
PRIVATE_ROOTS = ("/home/", "/Users/", "/root/", "/tmp/", "/var/folders/", "/private/", "/mnt/", "/media/", "/scratch/")
# An absolute posix path: a / not preceded by a word character, ':' or '/' (so URLs and fractions are not paths).
POSIX_PATH = re.compile(r"(?<![\w:/.\\-])/(?:[\w.@+~-]+/)*[\w.@+~-]+/?")
WINDOWS_PATH = re.compile(r"(?<![\w])[A-Za-z]:(?:\\\\|\\|/)(?:[^\s\"'<>|*?\\/]+(?:\\\\|\\|/)?)*")
# User names too common to look for as plain words (they still count as path components).
COMMON_USERS = {"root", "admin", "user", "users", "ubuntu", "runner", "test", "guest", "home", "data", "model"}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    what: str  # says what was found; a token is named by its variable, never shown

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


def environment_secrets() -> dict[str, str]:
    """Where each secret comes from -> its value: env vars named like TOKEN/KEY/SECRET, and the hub token."""
    secrets = {f"${name}": value for name, value in os.environ.items()
               if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH}  # fmt: skip
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # noqa: BLE001 - no hub token is no secret to look for
        token = None
    if token and len(token) >= MIN_SECRET_LENGTH and token not in secrets.values():
        secrets["the Hugging Face token (huggingface_hub.get_token())"] = token
    return secrets


def _home() -> str | None:
    home = os.path.expanduser("~").rstrip("/\\")
    return home if len(home) > 1 else None


def _user() -> str | None:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return None
    return name or None


def _is_private_path(text: str) -> bool:
    path = text.rstrip("/")
    if path.startswith(PRIVATE_ROOTS) or (path + "/") in PRIVATE_ROOTS:
        return True
    # Another absolute path that exists here and goes below the top level (a vocabulary may hold "/usr").
    return len(PurePosixPath(path).parts) > 2 and os.path.exists(path)


def _user_patterns(user: str | None) -> list[re.Pattern]:
    if not user:
        return []
    name = re.escape(user)
    patterns = [re.compile(rf"(?<=[/\\]){name}(?=[/\\]|\b|$)")]  # a path component
    if user.lower() not in COMMON_USERS and len(user) >= 4:
        patterns.append(re.compile(rf"(?<![\w.-]){name}(?![\w-])"))  # the name as a word
    return patterns


def find_private(text: str, file: str, secrets: dict[str, str] | None = None) -> list[Finding]:
    """Every local path, home directory, user name and secret in `text`, by line."""
    secrets = environment_secrets() if secrets is None else secrets
    home, user = _home(), _user()
    user_patterns = _user_patterns(user)
    found: list[Finding] = []
    for number, line in enumerate(text.splitlines(), 1):
        for source, value in secrets.items():
            if value in line:
                found.append(Finding(file, number, f"the value of {source}"))
        if home and home in line:
            found.append(Finding(file, number, f"the home directory {home}"))
        for match in POSIX_PATH.finditer(line):
            if _is_private_path(match.group()) and not (home and match.group().startswith(home)):
                found.append(Finding(file, number, f"the local path {match.group()}"))
        for match in WINDOWS_PATH.finditer(line):
            found.append(Finding(file, number, f"the local path {match.group()}"))
        if any(p.search(line) for p in user_patterns):
            found.append(Finding(file, number, f"the user name {user}"))
    return found


def _path_name(path: str, windows: bool = False) -> str:
    name = (PureWindowsPath(path.replace("\\\\", "\\")) if windows else PurePosixPath(path)).name
    return name or "<path>"


def redact_text(text: str, secrets: dict[str, str] | None = None) -> str:
    """`text` with secrets as <redacted>, local paths as their names, the home directory as ~ and the
    user name as <user>."""
    secrets = environment_secrets() if secrets is None else secrets
    for value in sorted(secrets.values(), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = WINDOWS_PATH.sub(lambda m: _path_name(m.group(), windows=True), text)
    text = POSIX_PATH.sub(lambda m: _path_name(m.group()) if _is_private_path(m.group()) else m.group(), text)
    home = _home()
    if home:
        text = text.replace(home, "~")
    for pattern in _user_patterns(_user()):
        text = pattern.sub(USER_PLACEHOLDER, text)
    return text


def is_text_file(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES or path.name.startswith("tokenizer") or path.name in ("vocab.txt", "merges.txt")


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a sentencepiece .model)."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
