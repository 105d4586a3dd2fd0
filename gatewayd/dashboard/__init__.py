"""The operator's dashboard: what the daemon samples and lists for it, and its static page.

- sampler.py: reads the Prometheus registry (and the transports' counters) every second into
  a ring buffer of the last minutes, served as JSON for the page's charts: no Prometheus
  server needed, nothing fetched from outside.
- inventory.py: agents (on disk and in memory), one agent's schedules, queue, dead letters
  and connections, and the devices the transports have seen.
- group.py: in cluster mode, the agent and device lists of the whole group (every live member
  asked, each row naming its member, members that did not answer named).
- static/: the page itself (vanilla HTML, CSS and JS modules, no build step).

Served by `gatewayd.api.dashboard` (a feature of the HTTP API). Must never import
`gatewayd.daemon` or `gatewayd.wiring`; it reads the running components it is handed.
"""
