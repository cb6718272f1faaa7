"""Metrics: the one table of names (``table``), Prometheus exporters (``exporter``) and the
Grafana dashboard generated from the table (``grafana``). Only ``exporter`` imports
prometheus_client."""
