"""The one place that turns ``MqttSettings`` into a paho client's credentials and TLS.

Gateways (edge/agent.py) and bridges (ingest/bridge.py) authenticate the same way, so a new
option (say, a TLS version floor) is added once for both.
"""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ops.settings import MqttSettings


def new_client(s: MqttSettings, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """A paho client with a persistent session (clean_session False) under ``client_id``, with the
    username/password and TLS or mTLS the settings name; the caller adds will and callbacks."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    if s.username:
        client.username_pw_set(s.username, s.password)
    if s.tls:
        client.tls_set(
            ca_certs=str(s.ca_file) if s.ca_file else None,
            certfile=str(s.cert_file) if s.cert_file else None,
            keyfile=str(s.key_file) if s.key_file else None,
        )
    return client
