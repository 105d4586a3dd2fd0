"""gatewayd.cluster: a group of gateways on NATS JetStream (cluster mode, `[cluster]`).

Each member is one gatewayd process. Device messages reach the group through one replicated
JetStream stream, partitioned by agent id; each partition has one owner at a time (a KV
bucket changed only by compare-and-set, liveness by heartbeat, writes fenced by epoch); every
commit of an agent's batch is appended to its partition's changelog before it commits (the
log's ingest floor is the acknowledgement), replies to devices are outbox rows of the same
commits sent through JetStream with deduplicating ids, and periodic snapshots go to the
object store, so the next owner restores the partition's agents after a member is lost. See ARCHITECTURE.md ("Beyond one
machine") and README ("Running a group of gateways").

Modules, one job each: `naming` (subjects, streams, the partition function), `pages` (an agent
database's changed pages), `changelog` (append, fencing, snapshot, restore), `ownership`
(heartbeats, liveness, assignment, compare-and-set), `ingest` (one partition's consumer),
`outputs` (device replies through JetStream), `replicator` (the agent runtime's hook),
`member` (one member's lifecycle), `status` (the operator's view), `routing` (where a
client's agent is served), `forward` (relaying a WebSocket or TCP client to the owner), `rpc`
(in-process calls forwarded over NATS), `operations` (named, typed operations on an agent
that its owner runs; no NATS), `credentials` (a `.creds` file, checked and signed with).

Must never import the daemon's assembly (`gatewayd.daemon`, `gatewayd.wiring`, `gatewayd.cli`,
`gatewayd.config`):
`gatewayd.wiring` builds a member from `ClusterSettings`. Reaches the agent runtime only through
its public methods (`submit_message`, `open_link`, `set_replicator`, `release_agents`,
`attach_outputs`, `recover_outputs`).
"""

from gatewayd.cluster.settings import ClusterSettings

__all__ = ["ClusterSettings"]
