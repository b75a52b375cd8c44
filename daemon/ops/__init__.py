"""Running the daemon: the service that wires the parts together, the workspace it runs in, systemd,
log lines, metrics, and the read-only HTTP API with its dashboard."""
