"""Encrypted credentials: Fernet through MultiFernet so the key can rotate; plaintext never leaves memory."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from expensify_exact.errors import VaultError
from expensify_exact.store import StateStore

KEY_ENV = "EXPENSIFY_EXACT_KEY"  # one or more Fernet keys, comma-separated, newest first
KEY_FILE_ENV = "EXPENSIFY_EXACT_KEY_FILE"
DEFAULT_KEY_FILE = Path.home() / ".config" / "expensify-exact" / "fernet.keys"


class Secret(str):
    """A string whose repr does not show it, so it cannot leak through a traceback or a debug print."""

    def __repr__(self) -> str:
        return "Secret('***')"


def key_file_path() -> Path:
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE)


def load_keys() -> list[bytes]:
    """The keys, newest first: from `EXPENSIFY_EXACT_KEY`, else from the key file (one key a line)."""
    raw = os.environ.get(KEY_ENV)
    source = f"${KEY_ENV}"
    if not raw:
        path = key_file_path()
        if not path.exists():
            raise VaultError(f"no encryption key: set {KEY_ENV} or create a key file with "
                             f"`expensify-exact secrets init-key` (looked for {path})")
        raw = path.read_text(encoding="utf-8")
        source = str(path)
    keys = [k.strip().encode() for k in raw.replace(",", "\n").splitlines() if k.strip()]
    for key in keys:
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise VaultError(f"the key in {source} is not a valid Fernet key") from None
    if not keys:
        raise VaultError(f"{source} holds no key")
    return keys


def create_key_file(path: Path | None = None) -> Path:
    """Write a new key file (mode 600) unless one exists; returns its path."""
    path = path or key_file_path()
    if path.exists():
        raise VaultError(f"a key file already exists at {path}; use `secrets rotate-key` to replace the key")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(Fernet.generate_key().decode() + "\n")
    return path


class CredentialVault:
    """Encrypts secrets into the state store and decrypts them on demand."""

    def __init__(self, store: StateStore, keys: list[bytes] | None = None):
        self._store = store
        self._keys = keys if keys is not None else load_keys()
        self._fernet = MultiFernet([Fernet(k) for k in self._keys])

    def __repr__(self) -> str:
        return f"CredentialVault(store={self._store.url!r}, keys={len(self._keys)})"

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str, what: str) -> Secret:
        try:
            return Secret(self._fernet.decrypt(ciphertext.encode()).decode())
        except InvalidToken:
            raise VaultError(f"cannot decrypt {what}: the key is wrong or the stored value was tampered with") from None

    def set(self, scope: str, name: str, value: str) -> None:
        if not value:
            raise VaultError(f"refusing to store an empty value for {scope}/{name}")
        self._store.put_secret(scope, name, self.encrypt(value))

    def get(self, scope: str, name: str) -> Secret:
        ciphertext = self._store.get_secret(scope, name)
        if ciphertext is None:
            raise VaultError(f"secret {scope}/{name} is not set; run `expensify-exact secrets set --connection "
                             f"{scope} {name}`")
        return self.decrypt(ciphertext, f"{scope}/{name}")

    def has(self, scope: str, name: str) -> bool:
        return self._store.get_secret(scope, name) is not None

    def rotate(self, new_key: bytes) -> int:
        """Re-encrypt every stored value under `new_key` (old keys still decrypt). Returns the count."""
        rotated = MultiFernet([Fernet(new_key)] + [Fernet(k) for k in self._keys])
        count = self._store.reencrypt_all(lambda c: rotated.rotate(c.encode()).decode())
        self._keys = [new_key] + self._keys
        self._fernet = rotated
        return count
