"""Sparkplug B host application: third-party gateways (Ignition Edge, Kura, HiveMQ Edge, Node-RED,
PLC gateways) into the bridge's path. ``sparkplug_b_pb2`` is generated from Eclipse Tahu's
``sparkplug_b.proto`` (see ``SOURCE.md``)."""
