"""Example agents shipped with gatewayd (see thermostat.py)."""
