"""Who may talk to Mosquitto, generated from the fleet registry (Mosquitto's dynamic-security plugin).

- Every registered gateway is a user named by its gateway id. It may publish only to its own
  ``scopemeter/v1/{supplier}/{site}/{gateway}/readings`` and ``…/status`` topics (its retained
  status and last will included) and may subscribe to nothing: no ``#``, no ``$share`` group.
- Each ingest bridge is a user of its own (``_bridge`` by default; a leading ``_`` can never be a
  gateway id, see ``edge.wire.Ident``). It may subscribe to readings topics, shared or not, and
  publish nothing.
- ``_admin`` may only send dynamic-security commands: that is how a running broker learns about a
  fleet change (``apply_live``), since the plugin does not re-read its file on SIGHUP.
- Mosquitto's ``use_username_as_clientid`` makes the client id the username, so nobody can take over
  a bridge's or a gateway's session by reusing its client id.

Why the plugin and not ``password_file`` + ``acl_file``: Mosquitto 2.0's acl_file never checks
SUBSCRIBE (src/security_default.c: "FIXME - implement ACL subscription strings"). Any user could join
the bridges' ``$share`` group, and every message the broker then hands that member is dropped by the
read check: lost after the PUBACK (tests/test_trust_broker.py shows the plugin refuses the SUBSCRIBE).

Passwords are random (``secrets``), kept in ``credentials.json`` (mode 0600) beside the plugin's file;
regenerating keeps each existing user's password and drops users no longer in the registry (revoked
and disconnected). The plugin's file stores PBKDF2-HMAC-SHA512 hashes (salt, 101 iterations, as
``mosquitto_passwd`` does), never the passwords.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg

from edge.wire import READINGS_SUBSCRIPTION, readings_topic, status_topic

BRIDGE_USER: Final = "_bridge"
ADMIN_USER: Final = "_admin"
PBKDF2_ITERATIONS: Final = 101  # mosquitto_passwd's default; the passwords themselves are 192 random bits
AUTH_DIR: Final = "mqtt-auth"  # under the stack's state dir
CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"

Acl = dict[str, Any]


@dataclass(frozen=True)
class GatewayGrant:
    supplier: str
    site: str
    gateway: str


@dataclass(frozen=True)
class AuthFiles:
    directory: Path

    @property
    def dynsec_file(self) -> Path:
        return self.directory / "dynamic-security.json"

    @property
    def credentials_file(self) -> Path:
        return self.directory / "credentials.json"

    def credentials(self) -> dict[str, str]:
        """username → password of every user; empty when nothing was generated yet."""
        try:
            data = json.loads(self.credentials_file.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def roles(self) -> dict[str, list[Acl]]:
        """rolename → ACLs as the plugin's file holds them now (empty when there is none)."""
        try:
            data = json.loads(self.dynsec_file.read_text())
        except FileNotFoundError:
            return {}
        return {r["rolename"]: _canonical(r.get("acls", [])) for r in data.get("roles", [])}


def auth_files(state_dir: Path) -> AuthFiles:
    return AuthFiles(state_dir.resolve() / AUTH_DIR)


def gateway_grants(conn: psycopg.Connection[Any]) -> list[GatewayGrant]:
    """Every registered gateway with the site and supplier it publishes for."""
    rows = conn.execute(
        "SELECT s.supplier_id, s.site_id, g.gateway_id FROM gateways g JOIN sites s USING (site_id)"
        " ORDER BY g.gateway_id"
    ).fetchall()
    return [GatewayGrant(*row) for row in rows]


def _acl(acltype: str, topic: str) -> Acl:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def _canonical(acls: Iterable[Acl]) -> list[Acl]:
    return sorted(({k: a[k] for k in ("acltype", "topic", "priority", "allow") if k in a} for a in acls),
                  key=lambda a: (a["acltype"], a["topic"]))  # fmt: skip


def desired_roles(grants: Iterable[GatewayGrant], bridge_users: Sequence[str]) -> dict[str, list[Acl]]:
    """One role per user (named like it): anything not granted is denied by the plugin's defaults."""
    roles: dict[str, list[Acl]] = {
        ADMIN_USER: [_acl(t, "$CONTROL/dynamic-security/#")
                     for t in ("publishClientSend", "publishClientReceive", "subscribePattern")],
    }  # fmt: skip
    for user in bridge_users:
        roles[user] = [
            _acl("subscribePattern", READINGS_SUBSCRIPTION),
            # Mosquitto 2.0.11 checks a shared subscription with its $share prefix; any group name,
            # since only bridges can subscribe at all.
            _acl("subscribePattern", f"$share/+/{READINGS_SUBSCRIPTION}"),
            _acl("publishClientReceive", READINGS_SUBSCRIPTION),
            _acl("unsubscribe", "#"),
        ]
    for g in grants:
        roles[g.gateway] = [
            _acl("publishClientSend", readings_topic(g.supplier, g.site, g.gateway)),
            _acl("publishClientSend", status_topic(g.supplier, g.site, g.gateway)),
        ]
    return {name: _canonical(acls) for name, acls in roles.items()}


def _hashed(password: str) -> dict[str, Any]:
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": PBKDF2_ITERATIONS}  # fmt: skip


def _client(username: str, password: str) -> dict[str, Any]:
    return {"username": username, **_hashed(password), "roles": [{"rolename": username}]}


def render_dynsec(creds: dict[str, str], roles: dict[str, list[Acl]]) -> dict[str, Any]:
    """The plugin's config file: deny by default; one client per user with its own role."""
    deny = dict.fromkeys(("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"), False)
    return {
        "defaultACLAccess": deny,
        "clients": [_client(u, pw) for u, pw in sorted(creds.items())],
        "groups": [],
        "roles": [{"rolename": name, "acls": acls} for name, acls in sorted(roles.items())],
    }


@dataclass(frozen=True)
class AuthPlan:
    """What ``write_auth`` produced: the credentials and the commands that move a broker running
    the previous files to the new ones (empty when nothing changed)."""

    credentials: dict[str, str]
    commands: list[dict[str, Any]]


def write_auth(
    files: AuthFiles,
    grants: Sequence[GatewayGrant],
    bridge_users: Sequence[str] = (BRIDGE_USER,),
) -> AuthPlan:
    """Write the plugin's file and the credentials for exactly these users. Existing users keep
    their passwords; users not given are revoked."""
    for user in bridge_users:
        if not user.startswith("_") or user == ADMIN_USER or any(c in user for c in ": \n/+#"):
            raise ValueError(f"bridge user {user!r} must start with '_', not be {ADMIN_USER}, and contain"
                             " no ':', space, newline, '/', '+' or '#'")  # fmt: skip
    users = [ADMIN_USER, *bridge_users, *(g.gateway for g in grants)]
    if len(set(users)) != len(users):
        raise ValueError("a user is named twice (two gateways with one id?)")
    old_creds, old_roles = files.credentials(), files.roles()
    creds = {u: old_creds.get(u) or secrets.token_urlsafe(24) for u in users}
    roles = desired_roles(grants, bridge_users)
    commands: list[dict[str, Any]] = []
    # A user whose role changed is recreated: dropping the role first would leave it unconstrained
    # by nothing but the deny-all defaults, which is safe, and the client reconnects once.
    gone = [u for u in old_roles if u not in roles or old_roles[u] != roles[u]]
    for u in gone:
        commands += [{"command": "deleteClient", "username": u}, {"command": "deleteRole", "rolename": u}]
    for u in roles:
        if u not in old_roles or u in gone:
            commands += [
                {"command": "createRole", "rolename": u, "acls": roles[u]},
                {"command": "createClient", "username": u, "password": creds[u], "roles": [{"rolename": u}]},
            ]
    files.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(files.directory, 0o700)
    _write_private(files.credentials_file, json.dumps(creds, indent=2, sort_keys=True) + "\n")
    _write_private(files.dynsec_file, json.dumps(render_dynsec(creds, roles), indent=1) + "\n")
    return AuthPlan(creds, commands)


def apply_live(host: str, port: int, admin_password: str, commands: list[dict[str, Any]],
               timeout: float = 30.0) -> None:  # fmt: skip
    """Send ``commands`` to a running broker's plugin as ``_admin`` and check every response.

    Raises RuntimeError naming the failing command; "not found"/"already exists" answers are the
    expected ones when the broker already had that state and are accepted.
    """
    if not commands:
        return
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    ready = threading.Event()
    answers: list[dict[str, Any]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{ADMIN_USER}-{uuid.uuid4().hex[:6]}")
    client.username_pw_set(ADMIN_USER, admin_password)
    failure: list[str] = []

    def on_connect(c: mqtt.Client, _u: object, _f: object, rc: Any, _p: object) -> None:
        if rc.is_failure:
            failure.append(f"connect refused: {rc}")
            done.set()
            return
        c.subscribe(f"{CONTROL_TOPIC}/response", qos=1)

    def on_subscribe(_c: mqtt.Client, _u: object, _m: int, codes: list[Any], _p: object) -> None:
        if any(code.is_failure for code in codes):
            failure.append(f"subscription to the responses refused: {codes}")
            done.set()
        ready.set()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        answers.extend(json.loads(msg.payload).get("responses", []))
        if len(answers) >= len(commands):
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(host, port)
    client.loop_start()
    try:
        if not ready.wait(timeout) or failure:
            raise RuntimeError(f"mqtt admin at {host}:{port}: {failure[0] if failure else 'no answer'}")
        client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
        if not done.wait(timeout):
            raise RuntimeError(f"mqtt admin at {host}:{port}: {len(answers)} of {len(commands)} answers")
    finally:
        client.disconnect()
        client.loop_stop()
    for cmd, answer in zip(commands, answers, strict=False):
        error = str(answer.get("error", ""))
        if error and not any(ok in error.lower() for ok in ("not found", "already exists")):
            name = cmd.get("username") or cmd.get("rolename")
            raise RuntimeError(f"mqtt admin: {cmd['command']} {name}: {error}")


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file only its owner can read."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
