"""One engine replica as a service (`prefixgate engine`): its HTTP API (`app`), the wire
protocol a gateway's remote client speaks (`protocol`), and its registration in Redis
(`discovery`: heartbeat, load, KV events)."""
