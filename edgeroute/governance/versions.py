"""Config versions: every applied config stored (number, hash, time, source, who), shown
with its secrets masked, diffed, checked, and rolled back to.

A version holds the config's YAML text as it was applied (comments included), so a
rollback applies exactly what ran before. What is shown is never that text but the parsed
config with every secret that is not a reference (`env:`, `file:`, `exec:`) masked.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgeroute import config as config_mod
from edgeroute import redact, secrets
from edgeroute.atomic_file import Staged, stage_file
from edgeroute.config import Config
from edgeroute.errors import ProxyError
from edgeroute.governance.store import AuditRow, Gate, GovStore, Version

log = logging.getLogger("edgeroute.governance")

MASK = "****"
# A literal secret in a stored version is its HMAC-SHA256 under the store's own random key
# (`GovStore.versions_key`): a database read alone (a replica, a backup) cannot check guesses.
# That key is in the same database, so a copy of all of it can: with `governance.versions_key`
# (a reference) a secret is sealed under the operator's key instead (`EXTERNAL`), kept outside
# the store. Versions stored before it hold an unsalted SHA-256 (`OLD_REDACTED`), still read.
REDACTED = "redacted:hmac-sha256:"
EXTERNAL = "redacted:hmac-sha256-ext:"
OLD_REDACTED = "redacted:sha256:"
_MARKERS = (REDACTED, EXTERNAL, OLD_REDACTED)
# Mapping keys whose string values are credentials (or may embed one), and every header value.
_SECRET_FIELDS = frozenset(
    {"api_key", "token", "token_sha256", "dsn", "redis_url", "api_keys", "secret", "aws_access_key_id",
     "aws_secret_access_key", "aws_session_token", "proxy", "signing_key", "experiment_salt"}
)  # fmt: skip
# Secret only when they carry credentials (user:password@); a proxy's may be written without a scheme.
_URLS = frozenset({"dsn", "redis_url", "proxy"})
# Or a password by name: libpq's keyword form (`host=db password=...`), a URL's `?password=`.
_PASSWORD_PARAM = re.compile(r"(?i)\bpassword\s*=")
# Any other URL with credentials in it (a `base_url`, a tracing endpoint): `scheme://user[:password]@`.
_URL_WITH_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*@")
# Or in its query, by a parameter's name holding a credential's word anywhere, percent-escapes
# and all (a collector's `?api_key=`, Google's `?key=`, a presigned URL's `X-Amz-Signature=`,
# `client_secret=`, `pwd=`, `sessionid=`, `api%5Fkey=`), in a URL or a path (a provider's
# `options.chat_path: /chat?code=...`, `health_check.path: /models?subscription-key=...`).
# Masking a harmless one costs nothing: a rollback puts the running value back.
_URL_WITH_KEY_PARAM = re.compile(
    r"(?i)(?:[a-z][a-z0-9+.-]*://|/)[^?#\s]*\?(?:[^#\s]*&)?[a-z0-9_.%-]*?"
    r"(?:key|token|auth|pass|pwd|secret|sig|code|credential|session|sid)[a-z0-9_.%-]*=[^&#\s]"
)


def _url_with_credentials(v: str) -> bool:
    return _URL_WITH_CREDENTIALS.match(v) is not None or _URL_WITH_KEY_PARAM.match(v) is not None


Leaf = tuple[Any, Any, tuple[Any, ...]]  # (container, key or index, path from the root)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(secret: str, key: bytes, prefix: str = REDACTED) -> str:
    """What a stored version holds for a literal secret (`prefix` says whose key sealed it)."""
    return prefix + hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys a version's literal secrets are sealed and checked with: `seal` seals new ones
    (the operator's first key when there is one, else the store's), `store` checks those the
    store's key sealed, `external` those the operator's keys sealed (each one it gave)."""

    seal: tuple[str, bytes]  # (marker prefix, key)
    store: Callable[[], bytes]
    external: tuple[bytes, ...] = ()


def _matches(marker: str, secret: str, keys: Keys) -> bool:
    """Whether a stored marker is `secret`'s, by whichever scheme and key sealed it."""
    if marker.startswith(EXTERNAL):
        return any(hmac.compare_digest(sealed(secret, k, EXTERNAL), marker) for k in keys.external)
    if marker.startswith(REDACTED):
        return hmac.compare_digest(sealed(secret, keys.store()), marker)
    return hmac.compare_digest(OLD_REDACTED + digest(secret)[:16], marker)


def _leaves(data: Any, path: tuple[Any, ...] = (), parent: str = "") -> Iterator[Leaf]:
    """Every literal secret in parsed config data (references such as `env:X` are not secrets)."""
    if isinstance(data, list):
        for i, x in enumerate(data):
            if isinstance(x, str) and _url_with_credentials(x):
                yield data, i, (*path, i)
            else:
                yield from _leaves(x, (*path, i), parent)
        return
    if not isinstance(data, dict):
        return
    for k, v in data.items():
        secret = k in _SECRET_FIELDS or parent == "headers"
        if secret and isinstance(v, str):
            if _literal(str(k), v):
                yield data, k, (*path, k)
        elif isinstance(v, str) and _url_with_credentials(v):
            yield data, k, (*path, k)
        elif secret and isinstance(v, list):
            yield from ((v, i, (*path, k, i)) for i, x in enumerate(v) if isinstance(x, str) and _literal(str(k), x))
        else:
            yield from _leaves(v, (*path, k), str(k))


def _literal(field: str, v: str) -> bool:
    if v.startswith((*secrets.REFERENCE_PREFIXES, *_MARKERS)):
        return False
    return ("@" in v or _PASSWORD_PARAM.search(v) is not None) if field in _URLS else True


def _webhook_urls(data: Any) -> Iterator[tuple[dict[str, Any], str]]:
    """Webhook URLs written literally (`alerts.webhooks.*.url`, a budget action's `webhook`): a
    Slack webhook's URL is its credential, so views mask them. They are stored as written (a
    rollback needs the URL): a reference (`env:`, `file:`, `exec:`) keeps one out of the store."""
    if not isinstance(data, dict):
        return
    alerts, budgets = data.get("alerts"), data.get("budgets")
    hooks = alerts.get("webhooks") if isinstance(alerts, dict) else None
    for hook in hooks.values() if isinstance(hooks, dict) else ():
        if isinstance(hook, dict) and isinstance(hook.get("url"), str) and _literal("url", hook["url"]):
            yield hook, "url"
    limits = budgets.get("limits") if isinstance(budgets, dict) else None
    for limit in limits if isinstance(limits, list) else ():
        actions = limit.get("actions") if isinstance(limit, dict) else None
        for action in actions if isinstance(actions, list) else ():
            if (
                isinstance(action, dict)
                and isinstance(action.get("webhook"), str)
                and _literal("webhook", action["webhook"])
            ):
                yield action, "webhook"


def mask(data: Any) -> Any:
    """`data` (parsed YAML, changed in place) with literal secrets replaced by a mask."""
    for container, key, _ in list(_leaves(data)):
        container[key] = MASK
    for hook, key in list(_webhook_urls(data)):
        hook[key] = MASK
    for container, key, _ in list(_redacted(data)):
        container[key] = MASK
    for container, key in list(_commands(data)):
        container[key] = redact.text(container[key])
    return data


def _commands(data: Any) -> Iterator[tuple[Any, Any]]:
    """Every `exec:` reference: shown, as references are, but a command may carry a credential
    of its own (`exec:curl -H 'X-Vault-Token: hvs.…' …`), which is redacted in views."""
    items: Any = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        if isinstance(v, str):
            if v.startswith("exec:"):
                yield data, k
        else:
            yield from _commands(v)


def _redacted(data: Any, path: tuple[Any, ...] = ()) -> Iterator[Leaf]:
    if isinstance(data, dict):
        items: Any = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return
    for k, v in items:
        if isinstance(v, str) and v.startswith(_MARKERS):
            yield data, k, (*path, k)
        else:
            yield from _redacted(v, (*path, k))


def for_storage(text: str, keys: Callable[[], Keys]) -> str:
    """The text to store for an applied config: itself, unless it holds literal secrets; then a
    dump with each replaced by its HMAC under `keys().seal` (no secret goes into the database; a
    rollback takes the value back from the running config when it is unchanged). A credential
    in a comment (a commented-out key) is redacted too."""
    data = yaml.safe_load(text)
    found = list(_leaves(data))
    if not found:
        return _comments_redacted(text, data)
    prefix, k = keys().seal
    for container, at, _ in found:
        container[at] = sealed(container[at], k, prefix)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _comments_redacted(text: str, data: Any) -> str:
    """`text` with the credentials in its comments redacted (`# was sk-proj-…`): no parsed value
    is a literal secret, but the text, comments and all, went into the database as written. When
    a value would change too (a `#` inside a multi-line scalar taken for a comment), the parsed
    config is stored instead, without its comments."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        at = _comment_at(line)
        if at is not None:
            lines[i] = line[:at] + redact.text(line[at:])
    cleaned = "".join(lines)
    if cleaned == text:
        return text
    try:
        same = yaml.safe_load(cleaned) == data
    except yaml.YAMLError:
        same = False
    return cleaned if same else yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _comment_at(line: str) -> int | None:
    """Where a YAML comment begins in `line` (a `#` at its start or after a blank, outside a
    quoted scalar), or None. A guess for lines of multi-line scalars: `_comments_redacted`
    checks that the values came through unchanged."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"" and (i == 0 or line[i - 1] in " \t:[{,-"):
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return i
    return None


def restore(stored: str, running: str, version: int, keys: Callable[[], Keys]) -> str:
    """A stored text ready to apply: each redacted literal secret taken from the running config's
    text at the same place, when its HMAC under the key that sealed it (`keys()`; or, stored
    before them, its hash) matches; ConfigError otherwise."""
    data = yaml.safe_load(stored)
    found = list(_redacted(data))
    if not found:
        return stored
    current = yaml.safe_load(running)
    missing = []
    k = keys()
    for container, at, path in found:
        value: Any = current
        for part in path:
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                value = None
                break
        if isinstance(value, str) and _matches(container[at], value, k):
            container[at] = value
        else:
            missing.append(".".join(str(p) for p in path))
    if missing:
        raise config_mod.ConfigError(
            [f"version {version}: the literal secret at {p} was never stored and the running config no longer "
             "has it, or it was sealed under a governance.versions_key this server no longer has (use env:, "
             "file: or exec: references to make versions restorable)" for p in missing]
        )  # fmt: skip
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# The parts of a config that say who may call what: the keys and their roles, teams and
# limits, the shared keys, who may reach a keyless proxy and `/metrics`, whether managed keys
# are served. A rollback that changes one of them is an admin's act (see `access_changes`).
ACCESS_FIELDS: tuple[tuple[str, ...], ...] = (
    ("keys",),
    ("server", "api_keys"),
    ("server", "metrics_public"),
    ("server", "allowed_hosts"),
    ("server", "allowed_origins"),
    ("governance", "managed_keys"),
)


def access_changes(running: str, target: str) -> list[str]:
    """The access fields (`ACCESS_FIELDS`, dotted) whose values differ between two config texts.
    An operator may roll back routing, deployments and budgets; with these, a version from
    before an admin demoted a key, moved it to a team or removed it (by reference: its `env:`
    or `file:` still resolves) made that key an admin again, in the hands of its holder."""

    def at(data: Any, path: tuple[str, ...]) -> Any:
        for part in path:
            data = data.get(part) if isinstance(data, dict) else None
        return data

    a, b = yaml.safe_load(running), yaml.safe_load(target)
    return [".".join(path) for path in ACCESS_FIELDS if at(a, path) != at(b, path)]


def masked_data(text: str) -> Any:
    """A stored version's config as data, secrets masked (stored texts parsed once before)."""
    try:
        return mask(yaml.safe_load(text))
    except yaml.YAMLError:
        return None


def masked_yaml(text: str) -> str:
    return yaml.safe_dump(masked_data(text), sort_keys=False, allow_unicode=True)


def text_of(cfg: Config, source: str) -> str:
    """The text to store for the config the server starts with: its file when it has one."""
    p = Path(source)
    if p.is_file():
        try:
            return p.read_text()
        except OSError:
            pass
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def version_json(v: Version, active: int | None) -> dict[str, Any]:
    return {
        "version": v.version,
        "hash": v.hash,
        "created_at": v.created_at,
        "source": v.source,
        "applied_by": v.applied_by,
        "active": v.version == active,
    }


# Sources of versions written back over the config file (`apply.apply_text`), and their audit actions.
_WRITTEN_BACK = ("api", "rollback:", "auto_rollback:")
_WRITTEN_BACK_ACTIONS = frozenset({"config.api", "config.rollback", "config.auto_rollback"})
_AUDIT_LOOKBACK = 200  # config entries searched for the newest version's own


@dataclass(frozen=True, slots=True)
class Saved:
    """A stored version: its number, its text as stored (literal secrets redacted) and as applied."""

    version: int
    stored: str
    text: str
    created: bool = True  # False: the same text as the latest version, whose number it took


class Versions:
    """This instance's running version, over the shared table of versions."""

    def __init__(self, store: GovStore) -> None:
        self.store = store
        self.active: int | None = None
        self.active_text = ""  # as stored (literal secrets redacted)
        self.running_text = ""  # as applied (for a rollback to take unchanged literal secrets from)
        self._key: bytes | None = None
        # The operator's key for literal secrets (`governance.versions_key`, resolved from
        # `external_ref` relative to `base_dir`), and every value it has had in this process: a
        # version sealed before a rotation (the secret's refresh) still restores.
        self.external_ref: str | None = None
        self.base_dir: Path | None = None
        self.external: secrets.Secret | None = None
        self._external_seen: list[bytes] = []
        # The config file's next text, written beside it (`stage_write`): put in place by `save`
        # right after the version is committed, before the config is swapped in.
        self.staged: Staged | None = None

    def save(
        self,
        text: str,
        source: str,
        applied_by: str | None,
        audit: Callable[[int, str], Sequence[AuditRow]] | None = None,
        audit_if_same: bool = True,
        gate: Gate | None = None,
    ) -> Saved:
        """Stores a config about to be applied, with its audit entries (`audit(version, hash)`)
        in one transaction (blocking: call off the event loop); `activate` makes it the running
        version. `gate`: see `GovStore.add_version`."""
        self._follow_external()  # here, off the loop (an `exec:` runs its command), not in a restore
        stored = for_storage(text, self.keys)
        h = digest(stored)
        entries = None if audit is None else lambda v: audit(v, h)
        v, created = self.store.add_version(h, source, applied_by, stored, entries, audit_if_same, gate)
        self._publish(text)
        return Saved(v, stored, text, created)

    def _publish(self, text: str) -> None:
        """Renames the staged config file over the file once its version is committed. Written
        after the swap, a kill -9 in between left the change recorded and audited but not in
        the file, and the restart applied the old file as a new version, silently undoing it;
        now only the rename itself follows the commit."""
        staged = self.staged
        if staged is None or staged.data != text.encode():
            return
        try:
            staged.publish()
        except OSError as e:  # the change is recorded: it is applied, `file_updated: false`
            log.warning("config applied, but the config file %s could not be updated: %s", staged.path, e.strerror)

    def key(self) -> bytes:
        """The store's key for literal secrets (`GovStore.versions_key`), read once."""
        if self._key is None:
            self._key = self.store.versions_key()
        return self._key

    def keys(self) -> Keys:
        """The keys to seal and check literal secrets with: the operator's when the config names
        one (`governance.versions_key`), whose first value seals; the store's for versions it
        sealed. Each value the operator's key has had stays known to this process, so a
        rotation (the secret's refresh) leaves the versions sealed before it restorable."""
        self._follow_external()
        if self.external is None:
            return Keys((REDACTED, self.key()), self.key)
        given = _values(self.external) or self._external_seen[:1]
        for k in given:
            if k not in self._external_seen:
                self._external_seen.append(k)
        return Keys((EXTERNAL, given[0]), self.key, tuple(self._external_seen))

    def use_external(self, ref: str | None, base_dir: Path | None) -> None:
        """Seals new versions under the key `ref` resolves to (None: the store's own) from now
        on; raises SecretError when it does not resolve, or to nothing (blocking: an `exec:`
        runs its command)."""
        self.external_ref, self.base_dir = ref, base_dir
        self.external = None if ref is None else secrets.resolve(ref, base_dir=base_dir)
        if self.external is not None and not _values(self.external):
            self.external = None
            raise secrets.SecretError("governance.versions_key resolves to nothing")
        self.keys()  # its value now is known from now on, whatever it is rotated to

    def _follow_external(self) -> None:
        """Resolves `external_ref` when a reload changed it; one that does not resolve keeps the
        key before it (logged): the config is applied, its version sealed as the one before."""
        ref = self.external_ref
        if ref == (self.external.reference if self.external is not None else None):
            return
        if ref is None:
            self.external = None
            return
        try:
            secret = secrets.resolve(ref, base_dir=self.base_dir)
        except secrets.SecretError as e:
            log.error("governance.versions_key: %s; versions are sealed under the key before it", e)
            self.external_ref = self.external.reference if self.external is not None else None
            return
        if _values(secret):
            self.external = secret
        else:
            log.error(
                "governance.versions_key: %s resolves to nothing; versions are sealed under the key before it", ref
            )

    def activate(self, saved: Saved) -> None:
        self.active, self.active_text, self.running_text = saved.version, saved.stored, saved.text

    def record(self, text: str, source: str, applied_by: str | None) -> int:
        """Stores an applied config and makes it active (blocking: call off the event loop). At
        start, says when it undoes a change recorded but never written to the file
        (`_undone_at_start`)."""
        newest = self.store.versions(1) if source == "start" else []
        if source == "start":  # read now, off the loop: a rollback's restore needs it on the loop
            self.key()
        saved = self.save(text, source, applied_by)
        self.activate(saved)
        if newest and saved.created:  # the worker that stored the start version says it, once
            try:
                self._undone_at_start(newest[0], saved)
            except Exception as e:  # a notice: the start is recorded, and goes on
                log.error("config versions: cannot check the start against the newest version (%s)", type(e).__name__)
        return saved.version

    def _undone_at_start(self, newest: Version, started: Saved) -> None:
        """Audits `config.reverted_at_start` (and logs a warning) when this start applies the
        very config the newest version, a change through the API, was made on: a process killed
        after that change was committed and before its file was renamed in place (the commit's
        round trip) restarted with the old file, silently undoing a change the audit log listed."""
        if not newest.source.startswith(_WRITTEN_BACK):
            return
        base = self._made_on(newest.version)
        if base is None or base.hash != digest(started.stored):
            return  # another config (an edit, another instance's file): a start, as any other
        log.warning(
            "config version %d (%s by %s) was recorded but the process ended before it was written to the "
            "config file: this start applied the file as it was before it (version %d) as version %d, undoing "
            "it. `edgeroute config rollback %d` applies it again.",
            newest.version, newest.source, newest.applied_by, base.version, started.version, newest.version,
        )  # fmt: skip
        undone = {"version": newest.version, "source": newest.source, "applied_by": newest.applied_by}
        self.store.audit("server", "config.reverted_at_start", "config", undone, {"version": started.version})

    def _made_on(self, version: int) -> Version | None:
        """The version an API change was made on, as its audit entry says (`before`)."""
        for e in self.store.audit_entries(action="config", limit=_AUDIT_LOOKBACK):
            if e.action in _WRITTEN_BACK_ACTIONS and isinstance(e.after, dict) and e.after.get("version") == version:
                was = e.before.get("version") if isinstance(e.before, dict) else None
                return self.store.version(was) if isinstance(was, int) else None
        return None

    def get(self, v: int) -> Version:
        # Past 64 bits no version exists, and the database could not take the number (a 500).
        found = self.store.version(v) if -(2**63) <= v < 2**63 else None
        if found is None:
            raise ProxyError(404, f"No config version {v}.", code="version_not_found", param="version")
        return found


def _values(key: secrets.Secret) -> list[bytes]:
    """The keys a `governance.versions_key` holds: one, or several split by spaces or commas (the
    first seals; the others, earlier keys kept through a rotation, only check)."""
    return [v.encode() for v in re.split(r"[\s,]+", key.reveal()) if v]


def check_text(text: str, source: str = "<check>") -> list[str]:
    """Every problem with a config text sent over the API, as `edgeroute check` reports them,
    offline (`secrets.offline`): references and TLS files are checked for their form, never
    resolved, run or read on this host."""
    try:
        with secrets.offline():
            config_mod.loads(text, source)
    except config_mod.ConfigError as e:
        return e.errors
    return []


def cannot_write(source: str) -> str | None:
    """Why `stage_write` could not replace the config file (a read-only mount, a directory it may
    not write), or None when it can: the file is replaced through a temporary file beside it."""
    p = Path(source)
    if not p.is_file():
        return "it is not a file"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
    return None


def stage_write(source: str, text: str) -> Staged | None:
    """The config file's next text, written and synced beside it (`Versions.save` puts it in
    place); None, logged, when there is no file or it cannot be written (`file_updated: false`)."""
    p = Path(source)
    if not p.is_file():
        return None
    prefix = f".{p.name}.staged."
    try:
        _clear_staged(p.parent, prefix)
        return stage_file(p, text.encode(), prefix=prefix)  # keeps the file's mode: it may hold literal tokens
    except OSError as e:
        log.warning(
            "the config file %s cannot be updated (%s): a change applied now is undone by a reload", p, e.strerror
        )
        return None


def _clear_staged(directory: Path, prefix: str) -> None:
    """Removes staged config files left by a process killed before putting one in place (each a
    copy of a config, its literal secrets too). Called under the config file's edit lock, so
    none is another change's."""
    for leftover in directory.iterdir():
        if leftover.name.startswith(prefix):
            leftover.unlink(missing_ok=True)
